//! The r2m error type. Every variant that concerns a file names it, so a user can find and fix
//! the input without reading a backtrace.

use std::path::PathBuf;

/// Result with [`R2mError`].
pub type Result<T, E = R2mError> = std::result::Result<T, E>;

/// Everything that can go wrong in r2m, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum R2mError {
    /// An operating-system I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file whose contents do not follow its format (truncated, corrupt, wrong magic, bad JSON).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A tensor the model needs is not in the checkpoint.
    #[error("{}: tensor `{name}` is missing from the checkpoint", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has a different shape than the config implies.
    #[error("{}: tensor `{name}` has shape {got:?}, but the config implies {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A model architecture r2m does not implement.
    #[error("{}: unknown architecture `{arch}` (supported: {supported})", path.display())]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    /// The tokenizer is missing or cannot be built.
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),

    /// Fetching a model or data set failed.
    #[error("fetch: {0}")]
    Fetch(String),

    /// A loss, reward or gradient became NaN or infinite; the run stops rather than train on it.
    #[error("step {step}: {tensor} is not finite ({value}); {saved}")]
    NonFinite {
        step: usize,
        /// What was not finite, e.g. `policy gradient norm` or `reward of row 3`.
        tensor: String,
        value: f64,
        /// What was saved before stopping, for the message.
        saved: String,
    },

    /// Anything else, with a description.
    #[error("{0}")]
    Other(String),
}

impl R2mError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A non-finite `value` of `tensor` at RL step `step` (the caller fills in what it saved).
    pub fn non_finite(step: usize, tensor: impl Into<String>, value: f64) -> Self {
        Self::NonFinite {
            step,
            tensor: tensor.into(),
            value,
            saved: "nothing saved yet".into(),
        }
    }

    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
