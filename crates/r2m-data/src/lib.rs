//! r2m-data
