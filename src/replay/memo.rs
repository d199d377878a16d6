//! Replays shared by the replicas of one process. In a simulation every client's replica holds
//! the same state and applies the same digest each round: one of them replays it, the others
//! take the result. Keyed by content (the state's hash before, the digest's hash and the replay
//! context), so a replica that differs (a corrupted one, another run) replays on its own, and
//! every replica still checks the digest's hash of the state it ends at.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::{sha256_of, ReplayContext, ReplayError, Replayable, RoundDigest, StateHash};
use super::{Replica, StateTransfer};
use crate::strategy::Told;

/// States larger than this are not kept (at the largest d, 10,000, a state is 1.6 GB).
const MAX_STATE_BYTES: usize = 1 << 28;

struct Entry<S> {
    before: StateHash,
    digest: [u8; 32],
    ctx: ReplayContext,
    after: S,
    told: Vec<Told>,
}

/// The last `capacity` replays, newest first.
pub struct ReplayMemo<S> {
    entries: Mutex<VecDeque<Entry<S>>>,
    capacity: usize,
}

impl<S: Replayable> ReplayMemo<S> {
    pub fn new(capacity: usize) -> Self {
        Self { entries: Mutex::new(VecDeque::with_capacity(capacity)), capacity }
    }

    /// `replica`'s strategy after `digest`, and the ranks and weights it gave: kept, or
    /// replayed and kept.
    pub(super) fn replay(
        &self,
        replica: &Replica<S>,
        digest: &RoundDigest,
    ) -> Result<(S, Vec<Told>), ReplayError> {
        let before = StateHash::of(&replica.strategy)?;
        let key = sha256_of("round digest", digest)?;
        let ctx = replica.ctx;
        let found = |e: &Entry<S>| e.before == before && e.digest == key && e.ctx == ctx;
        {
            // A panic elsewhere while holding the lock leaves whole entries only.
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = entries.iter().find(|e| found(e)) {
                return Ok((e.after.clone(), e.told.clone()));
            }
        }
        let (after, told) = replica.replay(digest)?;
        if StateTransfer::encoded_len_of(0, &after)? <= MAX_STATE_BYTES {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if !entries.iter().any(found) {
                let entry =
                    Entry { before, digest: key, ctx, after: after.clone(), told: told.clone() };
                entries.push_front(entry);
                entries.truncate(self.capacity);
            }
        }
        Ok((after, told))
    }
}
