//! Sampling parameters of a job and how it ended. They travel in job requests and receipts,
//! and a replay verifier must apply exactly the same sampler, so they live here.

use serde::{Deserialize, Serialize};

/// How the next token is chosen from the logits; with the seed, fully determines the output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability mass reaches p; 1.0 disables.
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens; 1.0 disables.
    pub repetition_penalty: f32,
    /// How many recent tokens (prompt included) the repetition penalty looks at.
    pub repeat_last_n: u32,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A sampling parameter outside its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingParamsError {
    /// Temperature must be finite and in [0, 100].
    #[error("temperature must be between 0 and 100, got {0}")]
    Temperature(f32),
    /// top_p must be in (0, 1].
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    /// Repetition penalty must be finite and positive.
    #[error("repetition_penalty must be > 0, got {0}")]
    RepetitionPenalty(f32),
}

impl SamplingParams {
    /// Greedy decoding: what benchmarks and reference answers use.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every field's domain once, at the edge.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(SamplingParamsError::Temperature(self.temperature));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingParamsError::TopP(self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingParamsError::RepetitionPenalty(
                self.repetition_penalty,
            ));
        }
        Ok(())
    }

    /// True when the sampler takes the argmax and ignores the seed.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Why generation ended, in OpenAI's vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-text token or a stop sequence matched.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The coordinator cancelled the job (its caller went away); the receipt covers the
    /// tokens generated until then.
    Cancelled,
    /// The node ended the job early because the path to the coordinator was about to close
    /// (a relay circuit at its time or byte limit); the receipt covers the tokens delivered.
    Interrupted,
}

impl FinishReason {
    /// The wire name (`stop`, `length`, `cancelled`, `interrupted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_domain_parameters_are_rejected() {
        let ok = SamplingParams::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..ok.clone()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..ok.clone()
            },
            SamplingParams {
                top_p: 0.0,
                ..ok.clone()
            },
            SamplingParams {
                top_p: 1.5,
                ..ok.clone()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?} accepted");
        }
    }

    #[test]
    fn missing_fields_take_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"seed": 7}"#).expect("parse");
        assert_eq!(p.seed, 7);
        assert!(p.is_greedy());
    }
}
