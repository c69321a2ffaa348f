//! Bindings generated from the committed artifacts (ABI and bytecode).
#![allow(missing_docs, clippy::too_many_arguments)]

alloy::sol!(
    #[derive(Debug, PartialEq, Eq)]
    TesseraToken,
    "artifacts/TesseraToken.json"
);

alloy::sol!(
    #[derive(Debug, PartialEq, Eq)]
    StepVerifier,
    "artifacts/StepVerifier.json"
);

alloy::sol!(
    #[derive(Debug, PartialEq, Eq)]
    Settlement,
    "artifacts/Settlement.json"
);
