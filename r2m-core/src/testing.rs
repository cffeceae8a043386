//! The backends the test suites run on, named once: every crate's tests take these aliases
//! instead of declaring their own.
//!
//! Compiled for r2m-core's own tests, and for other crates with the `testing` feature (which also
//! turns on burn's `flex` and `autodiff`): `r2m-core = { workspace = true, features = ["testing"] }`
//! in their `[dev-dependencies]`.

/// The CPU backend tests run on: burn-flex (which r2m's `fused` kernels recognize by type).
pub type TestBackend = burn::backend::Flex;

/// [`TestBackend`] with gradients.
pub type TestAutodiff = burn::backend::Autodiff<TestBackend>;
