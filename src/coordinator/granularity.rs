//! Dynamic Task granularity for scan Stages, after guided self-scheduling: a slot that takes a
//! scan slice much larger than its fair share of what its Stage still has to read (its queued
//! slices, and what its running ones have left) takes a piece of it instead, and leaves the other pieces queued for the slots that free up next. Early in a
//! Stage the planned slices pass whole (each is about one slot's share of one wave); at its
//! tail, the last slices are cut so that no slot, a slow one least of all, starts a large slice
//! while the others are about to go idle. Pure: `QueryRun` cuts, `Cluster` asks when.

use crate::config::{QuiverOptions, SLICE_PIECES_MAX};

/// When a queued scan slice is cut into pieces at dispatch; from the session's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granularity {
    /// No piece is smaller than this: below it a Task's fixed cost outweighs the balance won
    /// (and a Parquet range smaller than a row group reads nothing).
    pub piece_min_bytes: u64,
}

impl Granularity {
    pub fn from_options(options: &QuiverOptions) -> Option<Self> {
        options.dynamic_granularity.then_some(Self { piece_min_bytes: options.slice_piece_min_bytes.max(1) })
    }

    /// How many pieces a slice of `bytes` is cut into when a slot takes it, while its Stage has
    /// `pending_bytes` of slices to read (this one and the other queued ones, and what its
    /// running slices still have to read) for a cluster of `slots` slots. The fair share is
    /// what each slot would get if the pending work were spread over all slots; a slice over
    /// twice that is cut into pieces of about the share, at most [`SLICE_PIECES_MAX`]. 1: taken
    /// whole.
    pub fn pieces(&self, bytes: u64, pending_bytes: u64, slots: usize) -> u32 {
        let share = (pending_bytes / slots.max(1) as u64).max(self.piece_min_bytes);
        if bytes <= share.saturating_mul(2) {
            return 1;
        }
        (bytes / share).min(SLICE_PIECES_MAX as u64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const POLICY: Granularity = Granularity { piece_min_bytes: 8 * MIB };

    #[test]
    fn slices_pass_whole_while_a_wave_of_them_is_queued() {
        // 8 slices of 32 MiB on 4 slots: each is a fair share until the tail.
        assert_eq!(POLICY.pieces(32 * MIB, 8 * 32 * MIB, 4), 1);
        assert_eq!(POLICY.pieces(32 * MIB, 4 * 32 * MIB, 4), 1);
        assert_eq!(POLICY.pieces(32 * MIB, 2 * 32 * MIB, 4), 1);
    }

    #[test]
    fn the_last_slice_is_cut_for_the_slots_about_to_go_idle() {
        assert_eq!(POLICY.pieces(32 * MIB, 32 * MIB, 4), 4);
        // Never into pieces below the minimum…
        assert_eq!(POLICY.pieces(12 * MIB, 12 * MIB, 4), 1);
        assert_eq!(POLICY.pieces(16 * MIB, 16 * MIB, 4), 1);
        assert_eq!(POLICY.pieces(24 * MIB, 24 * MIB, 4), 3);
        // …nor into more than the bound.
        assert_eq!(POLICY.pieces(1024 * MIB, 1024 * MIB, 64), SLICE_PIECES_MAX);
    }
}
