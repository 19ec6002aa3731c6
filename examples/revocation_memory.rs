//! Measures the in-memory revocation store: heap bytes for one million logged-out sessions, and
//! that the entries are forgotten once the tokens they revoke have expired.
//!
//! `cargo run --release --example revocation_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tower_matrix_auth::store::TokenRef;
use tower_matrix_auth::{ManualClock, MemoryStore, SessionId, TokenStore};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    const N: u64 = 1_000_000;
    const NOW: u64 = 1_700_000_000_000;
    let clock = ManualClock::new(NOW);
    let store = MemoryStore::new().with_clock(clock.clone());
    let before = LIVE.load(Ordering::Relaxed);
    let token = |i: u64| TokenRef {
        user_id: "@user:example.org".to_owned(),
        session: SessionId::from_u128(
            u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
        ),
        generation: 0,
        epoch: 0,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for i in 0..N {
            // Each logout revokes a token living one more second than the last, up to ~11.6 days.
            store
                .revoke_session(&token(i), NOW + 1_000 * (i + 1))
                .await
                .unwrap();
        }
    });
    let used = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "{N} revocations: {} sessions held, {:.1} MiB heap, {:.0} bytes per revocation",
        store.len(),
        used as f64 / (1024.0 * 1024.0),
        used as f64 / N as f64
    );
    clock.set_ms(NOW + 1_000 * N / 2);
    store.sweep();
    println!(
        "half the revoked tokens expired: {} sessions held, {:.1} MiB heap",
        store.len(),
        (LIVE.load(Ordering::Relaxed) - before) as f64 / (1024.0 * 1024.0)
    );
    clock.set_ms(NOW + 1_000 * (N + 1));
    store.sweep();
    println!(
        "all expired: {} sessions held, {:.1} MiB heap",
        store.len(),
        (LIVE.load(Ordering::Relaxed) - before) as f64 / (1024.0 * 1024.0)
    );
}
