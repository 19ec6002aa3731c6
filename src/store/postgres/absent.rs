//! What `judge_from_database` learnt about rows that do not exist, so that a token naming a
//! generation no row has heard of costs one round trip, not one per request.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use crate::lifecycle::nonce::SessionId;

/// Entries kept at most; the set is emptied when it would grow past this.
const CAPACITY: usize = 4096;

/// (session, generation) pairs whose session had no row when the database was asked.
///
/// A generation exists only once the refresh that minted it has committed its row, and a token
/// of it is handed out only after that commit, so a token whose row was absent when asked was not
/// minted then: it is forged (a nonce appended to a token minted elsewhere), or its row was
/// purged because every token it spoke for had expired. Refusing it again without asking is
/// right, with one exception a client can only inflict on itself: asking about the exact
/// generation a later refresh of its own session will mint. That token is then refused until
/// this process's view hears of the refresh (normally milliseconds later; from then on the view
/// answers, not this set).
///
/// Bounded ([`CAPACITY`]), emptied on every reload and whenever the link is lost. Hashed with
/// the standard library's keyed SipHash, not the view's identity hash: these session ids come
/// from tokens' nonces that no row vouches for, so a client may have chosen them.
#[derive(Default)]
pub(super) struct AbsentRows(Mutex<HashSet<(SessionId, u32)>>);

impl AbsentRows {
    fn lock(&self) -> MutexGuard<'_, HashSet<(SessionId, u32)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn contains(&self, session: SessionId, generation: u32) -> bool {
        self.lock().contains(&(session, generation))
    }

    pub(super) fn insert(&self, session: SessionId, generation: u32) {
        let mut set = self.lock();
        if set.len() >= CAPACITY {
            set.clear();
        }
        set.insert((session, generation));
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }
}
