//! The in-process view of revocation state that both stores answer the layer's check from, so a
//! check costs a hash lookup and never a database round trip.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::identity::MatrixUser;
use crate::lifecycle::nonce::SessionId;
use crate::store::{position, user_key, Position, SessionState, Verdict};

/// Session ids are 128 random bits (or a SHA-256 prefix) that no client can choose, so their low
/// 64 bits are already a good hash: no need to pay for SipHash on every request.
#[derive(Default)]
pub(crate) struct SessionIdHasher(u64);

impl Hasher for SessionIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a u128 is hashed; fold it in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

/// What the view says about one verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    Active,
    Revoked,
    /// Valid, and the first use of a refresh's successor: the store must record it. Carries the
    /// token's place, so that the store need not read the nonce again.
    Promote(Position),
    /// A generation this view has not heard of (a refresh on another process, whose
    /// notification is on its way): revoked as far as this view knows; a store shared between
    /// processes asks its database. Never for a user logged out everywhere since the session
    /// began, nor for a nonce that contradicts the token's type.
    Unheard(Position),
}

/// One session's state and the user it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// [`user_key`] of the session's user.
    pub(crate) user: u64,
    pub(crate) state: SessionState,
}

#[derive(Default)]
pub(crate) struct View {
    pub(crate) sessions: HashMap<SessionId, Entry, BuildHasherDefault<SessionIdHasher>>,
    /// User id → floor: sessions whose epoch is below it are revoked ("log out everywhere").
    pub(crate) users: HashMap<Box<str>, u64>,
    /// Size of `sessions` after the last sweep: the next sweep waits until it doubles.
    swept_at_len: usize,
}

impl View {
    /// The user's floor: 0 if they never logged out everywhere.
    pub(crate) fn floor(&self, user_id: &str) -> u64 {
        if self.users.is_empty() {
            return 0;
        }
        self.users.get(user_id).copied().unwrap_or(0)
    }

    /// Whether a "log out everywhere" came after the session of `epoch` began.
    pub(crate) fn user_revoked(&self, user_id: &str, epoch: u64) -> bool {
        self.floor(user_id) > epoch
    }

    /// The state of `session` if it belongs to `user_id`; `Err(())` if it belongs to another
    /// user (no token of theirs can name it, so fail closed).
    pub(crate) fn state(
        &self,
        session: SessionId,
        user_id: &str,
    ) -> Result<Option<&SessionState>, ()> {
        match self.sessions.get(&session) {
            None => Ok(None),
            Some(entry) if entry.user == user_key(user_id) => Ok(Some(&entry.state)),
            Some(_) => Err(()),
        }
    }

    /// The state of `session` to change, created for `user_id` if new; `None` if it belongs to
    /// another user.
    pub(crate) fn state_mut(
        &mut self,
        session: SessionId,
        user_id: &str,
    ) -> Option<&mut SessionState> {
        let user = user_key(user_id);
        let entry = self.sessions.entry(session).or_insert(Entry {
            user,
            state: SessionState::default(),
        });
        (entry.user == user).then_some(&mut entry.state)
    }

    pub(crate) fn judge(&self, user: &MatrixUser) -> Judgement {
        let position = position(user);
        if position.contradicts_type || self.user_revoked(user.user_id(), position.epoch) {
            return Judgement::Revoked;
        }
        let (session, generation) = (position.session, position.generation);
        let verdict = match self.state(session, user.user_id()) {
            // No refresh or logout ever touched this session: only generation 0 exists.
            Ok(None) if generation == 0 => Verdict::Active,
            Ok(None) => return Judgement::Unheard(position),
            Err(()) => Verdict::Revoked,
            Ok(Some(state)) if !state.revoked && generation >= state.next_generation => {
                return Judgement::Unheard(position)
            }
            Ok(Some(state)) => state.verdict(generation),
        };
        match verdict {
            Verdict::Active => Judgement::Active,
            Verdict::Revoked => Judgement::Revoked,
            Verdict::Promote => Judgement::Promote(position),
        }
    }

    /// Takes a state from elsewhere (a database row, a notification) unless an equal or newer
    /// version is already here: updates may arrive out of order.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn merge(&mut self, session: SessionId, user_id: &str, state: SessionState) {
        match self.sessions.get(&session) {
            Some(current) if current.state.version >= state.version => {}
            _ => {
                self.sessions.insert(
                    session,
                    Entry {
                        user: user_key(user_id),
                        state,
                    },
                );
            }
        }
    }

    /// Makes room for `sessions` sessions in all (a load's count), so that the map does not grow
    /// step by step while they are merged.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn reserve_sessions(&mut self, sessions: usize) {
        self.sessions
            .reserve(sessions.saturating_sub(self.sessions.len()));
    }

    /// A load of every live session is complete: nothing in the map has expired, so the next
    /// sweep waits until it has doubled again (rather than running through the whole map, under
    /// the write lock, at the first write after a load of millions).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn loaded(&mut self) {
        self.swept_at_len = self.sessions.len();
    }

    /// Raises a user's floor to `floor` (never lowers it).
    pub(crate) fn merge_user(&mut self, user_id: &str, floor: u64) {
        let entry = self.users.entry(user_id.into()).or_insert(0);
        *entry = (*entry).max(floor);
    }

    /// Forgets entries whose tokens have all stopped verifying, amortized over the writes that
    /// grow the map.
    pub(crate) fn sweep_if_due(&mut self, now_ms: u64) {
        if self.sessions.len() >= 1024 && self.sessions.len() >= self.swept_at_len * 2 {
            self.sweep(now_ms);
        }
    }

    pub(crate) fn sweep(&mut self, now_ms: u64) {
        self.sessions
            .retain(|_, entry| entry.state.until_ms > now_ms);
        self.swept_at_len = self.sessions.len();
        // A map keeps its capacity when emptied; give memory back once it is mostly unused.
        if self.sessions.capacity() > 4 * self.sessions.len() + 1024 {
            self.sessions.shrink_to(2 * self.sessions.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a load the map holds only live sessions: the first write does not sweep it all.
    #[test]
    fn the_first_write_after_a_load_does_not_sweep_the_whole_map() {
        let state = SessionState {
            until_ms: 10,
            ..SessionState::default()
        };
        let mut view = View::default();
        for i in 0..4096 {
            view.merge(SessionId::from_u128(i), "@a:b", state);
        }
        view.loaded();
        // At 20 these have expired (a sweep would forget them): none is due yet.
        view.sweep_if_due(20);
        assert_eq!(view.sessions.len(), 4096);
        // Without `loaded`, the first write after the load sweeps everything.
        view.swept_at_len = 0;
        view.sweep_if_due(20);
        assert_eq!(view.sessions.len(), 0);
    }
    use crate::{lifecycle::SessionRequest, Issuer, KeyRing, MacaroonSecret, TokenType, Verifier};

    /// A generation the view has not heard of is `Unheard` (a shared store asks its database),
    /// unless the user logged out everywhere since the session began: then it is revoked, and
    /// no database row can make it active again.
    #[test]
    fn an_unheard_generation_of_a_user_logged_out_everywhere_is_revoked() {
        let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s"));
        let issuer = Issuer::new(keys.clone());
        let verifier = Verifier::new(keys);
        let parts = http::Request::new(()).into_parts().0;
        let request = SessionRequest::new().refresh(true);
        let first = issuer.new_session("@a:b", &request, 0);
        let refresh = verifier
            .verify(
                first.refresh_token.unwrap().as_bytes(),
                TokenType::Refresh,
                &parts,
            )
            .unwrap();
        let nonce = crate::lifecycle::TokenNonce::of(&refresh).unwrap();
        // Minted by "another process": this view never heard of generation 1.
        let next = issuer.successor(&refresh, &nonce, 1, issuer.now_ms());
        let user = verifier
            .verify(next.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        let mut view = View::default();
        let Judgement::Unheard(unheard) = view.judge(&user) else {
            panic!("generation 1 is unheard of");
        };
        assert_eq!((unheard.session, unheard.generation), (nonce.session, 1));
        view.merge_user("@a:b", 1);
        assert_eq!(view.judge(&user), Judgement::Revoked);
    }
}
