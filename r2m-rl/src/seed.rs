//! Every random stream of a run is derived from the run seed, the step and a stream id, so that
//! restoring the step counter restores them (exact resume).

/// Stream ids of [`step_seed`].
pub mod stream {
    /// Sampling a step's responses.
    pub const SAMPLE: u64 = 0;
    /// One generation batch within a step.
    pub const GENERATION_BATCH: u64 = 1;
    /// The mini-batch shuffle of the policy update.
    pub const UPDATE: u64 = 2;
    /// The prompt order of one pass over the data.
    pub const PROMPTS: u64 = 3;
}

/// The seed of stream `stream` at `step` of a run seeded with `seed` (splitmix64 of the three).
pub fn step_seed(seed: u64, step: usize, stream: u64) -> u64 {
    let mut x = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.rotate_left(32);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_seeds_differ() {
        assert_ne!(step_seed(0, 0, 0), step_seed(0, 1, 0));
        assert_ne!(step_seed(0, 0, 0), step_seed(0, 0, 1));
        assert_eq!(step_seed(3, 4, 5), step_seed(3, 4, 5));
    }
}
