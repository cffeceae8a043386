//! End-to-end tests live in tests/tests/e2e/.
