//! The committed artifacts are what the pinned solc makes of the committed sources,
//! byte for byte: a changed contract without a recompile, or a different compiler,
//! fails here.

use std::path::Path;

#[test]
fn compiling_the_sources_again_reproduces_the_committed_artifacts() {
    // The manifest directory at run time: cargo sets it for tests, and a test binary reused
    // from a shared target directory may have been built in another checkout.
    let here = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    );
    let out = tempfile::tempdir().expect("dir");
    let status = std::process::Command::new("node")
        .arg(here.join("compile.mjs"))
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("node runs (scripts/contracts.sh installs it)");
    assert!(
        status.success(),
        "compile.mjs failed ({status}); scripts/contracts.sh installs the pinned solc"
    );
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let committed = here.join("artifacts");
    assert_eq!(
        names(out.path()),
        names(&committed),
        "the same set of contracts"
    );
    for name in names(&committed) {
        let fresh = std::fs::read(out.path().join(&name)).expect("fresh");
        let kept = std::fs::read(committed.join(&name)).expect("committed");
        assert!(
            fresh == kept,
            "{name} differs from a fresh compile: run scripts/contracts.sh --compile and commit"
        );
    }
    for (name, json) in tessera_contracts::ARTIFACTS {
        let kept = std::fs::read_to_string(committed.join(format!("{name}.json"))).expect("file");
        assert_eq!(json, kept, "the crate embeds the committed {name}");
    }
}
