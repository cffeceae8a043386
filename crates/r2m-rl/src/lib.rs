//! r2m-rl
