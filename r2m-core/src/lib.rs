//! r2m-core: the pieces every other r2m crate shares.
//!
//! - [`error`]: the one error type, with the file (and line or tensor) that went wrong;
//! - [`tensor`]: small tensor helpers (masked mean, per-token log-prob gather);
//! - [`loss`]: preference losses (Bradley-Terry);
//! - [`observe`]: progress and messages from library code, without printing ([`observe::Observer`]);
//! - [`optim`]: warm-up + cosine learning rate, global gradient-norm clipping;
//! - [`r2m`]: R2M itself: the fusion head, the w(t) schedule and the GREBT loss
//!   (`shared/r2m-method.md` §2-§3);
//! - [`testing`] (tests, and the `testing` feature): the backend aliases every test suite uses.

pub mod error;
pub mod loss;
pub mod observe;
pub mod optim;
pub mod r2m;
pub mod tensor;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{R2mError, Result};
pub use observe::{Observer, Silent};
