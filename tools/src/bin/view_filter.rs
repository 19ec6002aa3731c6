//! A prototype for deployments with too many revoked sessions for the in-process view (issue 17):
//! the view would keep only recent changes (and sessions with refresh state), and the old
//! logged-out sessions would be held in a compact set of session-id fingerprints, the database
//! being the truth on a hit. Not wired into the store: this measures what the compact sets cost
//! and how often a session that is not in them would hit anyway (a needless database read).
//!
//! ```text
//! view_filter [--sessions 10000000] [--probes 10000000]
//! ```
//!
//! Session ids are 128 random bits, so any 64 or 32 of them are already a uniform hash. Sets of
//! `--sessions` random ids, each probed with `--probes` ids that are not members:
//! - a sorted `Vec<u64>` of the ids' low 64 bits (binary search): 8 bytes a session, a false
//!   positive about once in 2^64 / n probes;
//! - a sorted `Vec<u32>` of 32 of their bits: 4 bytes a session, false positives n / 2^32;
//! - the same with a directory: the ids' top 20 bits pick a bucket (2^20 `u32` offsets, 4 MB)
//!   and only the bucket's few fingerprints are searched, so a lookup touches two or three cache
//!   lines and the directory's bits add to the fingerprint's (`u32`: 52 bits in all, `u16`: 36);
//! - a blocked Bloom filter (one 512-bit block a key, 7 bits set in it), 10 bits a session.

use std::time::Instant;

use rand::{rngs::StdRng, Rng, SeedableRng};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// A blocked Bloom filter: each key sets `K` bits in one 64-byte block (one cache line).
struct Bloom {
    blocks: Vec<[u64; 8]>,
}

const K: u32 = 7;

impl Bloom {
    fn new(keys: usize, bits_per_key: usize) -> Self {
        let blocks = (keys * bits_per_key).div_ceil(512).max(1);
        Self {
            blocks: vec![[0; 8]; blocks],
        }
    }

    /// The block and the bit positions of `id` (128 uniform bits): the block from 32 of the
    /// high 64, each bit from 9 of the low 64.
    fn place(&self, id: u128) -> (usize, impl Iterator<Item = u32>) {
        let high = (id >> 96) as u64;
        let block = ((high * self.blocks.len() as u64) >> 32) as usize;
        let low = id as u64;
        (block, (0..K).map(move |i| ((low >> (i * 9)) & 511) as u32))
    }

    fn insert(&mut self, key: u128) {
        let (block, bits) = self.place(key);
        for bit in bits {
            self.blocks[block][(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    fn contains(&self, key: u128) -> bool {
        let (block, mut bits) = self.place(key);
        let block = &self.blocks[block];
        bits.all(|bit| block[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// Fingerprints sorted within buckets chosen by the ids' top `DIRECTORY_BITS` bits.
struct Directory<T> {
    starts: Vec<u32>,
    fingerprints: Vec<T>,
}

const DIRECTORY_BITS: u32 = 20;

impl<T: Copy + Ord> Directory<T> {
    fn bucket(id: u128) -> usize {
        (id >> (128 - DIRECTORY_BITS)) as usize
    }

    fn new(ids: &[u128], fingerprint: fn(u128) -> T) -> Self {
        let mut keyed: Vec<(usize, T)> = ids
            .iter()
            .map(|&id| (Self::bucket(id), fingerprint(id)))
            .collect();
        keyed.sort_unstable();
        let mut starts = vec![0u32; (1 << DIRECTORY_BITS) + 1];
        for &(bucket, _) in &keyed {
            starts[bucket + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        Self {
            starts,
            fingerprints: keyed.into_iter().map(|(_, f)| f).collect(),
        }
    }

    fn contains(&self, id: u128, fingerprint: fn(u128) -> T) -> bool {
        let bucket = Self::bucket(id);
        let range = self.starts[bucket] as usize..self.starts[bucket + 1] as usize;
        self.fingerprints[range].contains(&fingerprint(id))
    }

    fn bytes(&self) -> usize {
        self.starts.len() * 4 + self.fingerprints.len() * std::mem::size_of::<T>()
    }
}

struct Measured {
    name: &'static str,
    bytes: usize,
    build_s: f64,
    hit_ns: f64,
    miss_ns: f64,
    false_positives: usize,
}

fn measure(
    name: &'static str,
    members: &[u128],
    probes: &[u128],
    build: impl FnOnce(&[u128]) -> (usize, Box<dyn Fn(u128) -> bool>),
) -> Measured {
    let t = Instant::now();
    let (bytes, contains) = build(members);
    let build_s = t.elapsed().as_secs_f64();
    let sample = &members[..members.len().min(probes.len())];
    let t = Instant::now();
    let hits = sample.iter().filter(|&&id| contains(id)).count();
    let hit_ns = t.elapsed().as_nanos() as f64 / sample.len() as f64;
    assert_eq!(hits, sample.len(), "{name}: a member was not found");
    let t = Instant::now();
    let false_positives = probes.iter().filter(|&&id| contains(id)).count();
    let miss_ns = t.elapsed().as_nanos() as f64 / probes.len() as f64;
    Measured {
        name,
        bytes,
        build_s,
        hit_ns,
        miss_ns,
        false_positives,
    }
}

fn main() {
    let sessions = arg("--sessions", 10_000_000);
    let probes = arg("--probes", 10_000_000);
    let mut rng = StdRng::seed_from_u64(17);
    let members: Vec<u128> = (0..sessions).map(|_| rng.gen()).collect();
    // Ids that are not members (a collision of 128 random bits does not happen).
    let others: Vec<u128> = (0..probes).map(|_| rng.gen()).collect();
    let results = [
        measure(
            "sorted Vec<u64> (64 bits of the id)",
            &members,
            &others,
            |m| {
                let mut set: Vec<u64> = m.iter().map(|&id| id as u64).collect();
                set.sort_unstable();
                set.shrink_to_fit();
                let bytes = set.capacity() * 8;
                (
                    bytes,
                    Box::new(move |id| set.binary_search(&(id as u64)).is_ok()),
                )
            },
        ),
        measure(
            "sorted Vec<u32> (32 bits of the id)",
            &members,
            &others,
            |m| {
                let mut set: Vec<u32> = m.iter().map(|&id| (id >> 64) as u32).collect();
                set.sort_unstable();
                set.shrink_to_fit();
                let bytes = set.capacity() * 4;
                (
                    bytes,
                    Box::new(move |id| set.binary_search(&((id >> 64) as u32)).is_ok()),
                )
            },
        ),
        measure(
            "directory of 2^20 + u32 fingerprints",
            &members,
            &others,
            |m| {
                let fp = |id: u128| id as u32;
                let set = Directory::new(m, fp);
                (set.bytes(), Box::new(move |id| set.contains(id, fp)))
            },
        ),
        measure(
            "directory of 2^20 + u16 fingerprints",
            &members,
            &others,
            |m| {
                let fp = |id: u128| id as u16;
                let set = Directory::new(m, fp);
                (set.bytes(), Box::new(move |id| set.contains(id, fp)))
            },
        ),
        measure(
            "blocked Bloom filter, 10 bits a session",
            &members,
            &others,
            |m| {
                let mut bloom = Bloom::new(m.len(), 10);
                for &id in m {
                    bloom.insert(id);
                }
                let bytes = bloom.blocks.len() * 64;
                (bytes, Box::new(move |id| bloom.contains(id)))
            },
        ),
    ];
    println!(
        "{sessions} sessions in the set, {probes} probes of ids not in it (a false positive = a needless database read)"
    );
    println!("| set | bytes a session | build | lookup, member | lookup, not a member | false positives |");
    println!("|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {:.2} | {:.2} s | {:.0} ns | {:.0} ns | {} ({:.4} %) |",
            r.name,
            r.bytes as f64 / sessions as f64,
            r.build_s,
            r.hit_ns,
            r.miss_ns,
            r.false_positives,
            r.false_positives as f64 * 100.0 / probes as f64
        );
    }
}
