//! Passwords (argon2id, PHC strings with their own salt) and access tokens (32 random bytes,
//! hex; the server stores only their SHA-256, so a leaked database holds no usable token).
//!
//! Hashing is deliberately expensive (≈19 MiB and tens of milliseconds each at the default
//! cost), so it is the first thing a stranger would use to exhaust the server: measured before
//! this pool existed, 200 concurrent sign-ups took the server to 7.5 GiB. Every hash and every
//! verification therefore runs on a [`PasswordHasher`]: a fixed set of worker threads, each
//! owning one reusable argon2 memory buffer, behind a bounded queue. The server's memory for
//! passwords is at most `workers × memory_kib` whatever the load; a request that finds the
//! queue full is refused at once with `unavailable` and a retry-after instead of waiting.

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// argon2id cost and the bounds of the hashing pool. The cost defaults are the argon2 crate's
/// (OWASP's first recommendation: 19 MiB, 2 passes, 1 lane); lower them only for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordHashing {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hashes computed at once; 0: one per core. Also capped by `memory_budget_mib`.
    pub workers: usize,
    /// Memory the workers may hold together (each holds `memory_kib`).
    pub memory_budget_mib: u64,
    /// Requests waiting for a worker; beyond this they are refused with `unavailable`.
    pub max_waiting: usize,
}

impl Default for PasswordHashing {
    fn default() -> Self {
        PasswordHashing {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
            parallelism: Params::DEFAULT_P_COST,
            workers: 0,
            memory_budget_mib: 256,
            max_waiting: 64,
        }
    }
}

impl PasswordHashing {
    pub fn params(&self) -> Result<Params, String> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| e.to_string())
    }

    /// How many workers run: one per core (or `workers`), as many as the budget holds, at
    /// least one.
    pub fn effective_workers(&self) -> usize {
        let wanted = if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        };
        let per_worker = u64::from(self.memory_kib.max(1)).div_ceil(1024).max(1);
        let fit = (self.memory_budget_mib / per_worker).max(1);
        wanted.min(fit as usize).max(1)
    }

    /// The most memory the workers' buffers take together, in bytes.
    pub fn memory_bound_bytes(&self) -> u64 {
        self.effective_workers() as u64 * u64::from(self.memory_kib) * 1024
    }
}

/// Why a password could not be hashed or checked now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// Every worker is busy and the queue is full: retry later.
    #[error("password hashing is at capacity")]
    Busy,
    /// The pool is gone (shutting down) or hashing failed.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

enum Task {
    Hash(String),
    Verify { password: String, hash: String },
}

enum Outcome {
    Hashed(Result<String, String>),
    Verified(bool),
}

struct Job {
    task: Task,
    reply: oneshot::Sender<Outcome>,
}

/// The bounded pool of argon2 workers (module docs).
pub struct PasswordHasher {
    /// Bounded, and allocated as it fills (a `std` sync channel would allocate every waiting
    /// place up front: 64 MB for a million).
    jobs: mpsc::Sender<Job>,
    workers: usize,
}

impl PasswordHasher {
    /// Starts the workers. They stop when the hasher is dropped.
    pub fn start(config: &PasswordHashing) -> Result<PasswordHasher, String> {
        let params = config.params()?;
        let workers = config.effective_workers();
        let (jobs, queue) = mpsc::channel::<Job>(config.max_waiting);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let (queue, params) = (queue.clone(), params.clone());
            std::thread::Builder::new()
                .name(format!("tern-argon2-{i}"))
                .spawn(move || worker(&queue, &params))
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(
            workers,
            memory_mib = config.memory_bound_bytes() >> 20,
            max_waiting = config.max_waiting,
            "password hashing pool"
        );
        Ok(PasswordHasher { jobs, workers })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    async fn run(&self, task: Task) -> Result<Outcome, HashError> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job { task, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("tern_password_hashing_refused_total").increment(1);
                return Err(HashError::Busy);
            }
            Err(TrySendError::Closed(_)) => {
                return Err(HashError::Failed("the hashing pool stopped".into()));
            }
        }
        answer
            .await
            .map_err(|_| HashError::Failed("a hashing worker stopped".into()))
    }

    /// Hashes a password with the configured cost and a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        match self.run(Task::Hash(password)).await? {
            Outcome::Hashed(r) => r.map_err(HashError::Failed),
            Outcome::Verified(_) => Err(HashError::Failed("unexpected answer".into())),
        }
    }

    /// Checks a password against a stored PHC hash (its own parameters are used).
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, HashError> {
        match self.run(Task::Verify { password, hash }).await? {
            Outcome::Verified(ok) => Ok(ok),
            Outcome::Hashed(_) => Err(HashError::Failed("unexpected answer".into())),
        }
    }
}

/// One worker: takes jobs until the hasher is dropped, reusing its memory buffer.
fn worker(queue: &Mutex<mpsc::Receiver<Job>>, params: &Params) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = {
            let Ok(mut queue) = queue.lock() else { return };
            match queue.blocking_recv() {
                Some(job) => job,
                None => return,
            }
        };
        // The caller gave up (its request ended): skip the work.
        if job.reply.is_closed() {
            continue;
        }
        let outcome = match job.task {
            Task::Hash(password) => Outcome::Hashed(hash_with(&password, params, &mut memory)),
            Task::Verify { password, hash } => {
                Outcome::Verified(verify_with(&password, &hash, &mut memory))
            }
        };
        let _ = job.reply.send(outcome);
    }
}

/// The argon2id hash of `password` as a PHC string, computed in `memory`.
fn hash_with(password: &str, params: &Params, memory: &mut Vec<Block>) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let mut raw = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut raw).map_err(|e| e.to_string())?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = Output::init_with(len, |out| {
        argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt_bytes,
                out,
                sized(memory, params),
            )
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
    .map_err(|e| e.to_string())?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|e| e.to_string())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash`, computed in `memory`.
fn verify_with(password: &str, hash: &str, memory: &mut Vec<Block>) -> bool {
    let mut check = || -> Option<bool> {
        let parsed = PasswordHash::new(hash).ok()?;
        let expected = parsed.hash?;
        let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
        let version = parsed
            .version
            .map_or(Some(Version::V0x13), |v| Version::try_from(v).ok())?;
        let params = Params::try_from(&parsed).ok()?;
        let mut raw = [0u8; 64];
        let salt = parsed.salt?.decode_b64(&mut raw).ok()?;
        let argon = Argon2::new(algorithm, version, params.clone());
        let mut out = vec![0u8; expected.len()];
        argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                sized(memory, &params),
            )
            .ok()?;
        // `Output`'s equality is constant-time.
        Some(Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

/// The worker's buffer with exactly the blocks `params` needs. It grows to the largest cost
/// seen (a stored hash made with a higher cost than today's) and is never shrunk.
fn sized<'a>(memory: &'a mut Vec<Block>, params: &Params) -> &'a mut [Block] {
    let n = params.block_count();
    if memory.len() < n {
        memory.resize(n, Block::default());
    }
    &mut memory[..n]
}

/// A hash to verify against when the user does not exist, so that an unknown username costs
/// the same time as a wrong password (no user enumeration by timing). Made once at start-up
/// with the configured cost.
pub fn decoy_hash(config: &PasswordHashing) -> Result<String, String> {
    hash_with(&new_token(), &config.params()?, &mut Vec::new())
}

/// A fresh access token: 32 random bytes as hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    fn cheap() -> PasswordHashing {
        PasswordHashing {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            workers: 1,
            max_waiting: 2,
            ..PasswordHashing::default()
        }
    }

    #[test]
    fn hashes_are_standard_phc_strings() {
        for cost in [PasswordHashing::default(), cheap()] {
            let params = cost.params().expect("params");
            let mut mem = Vec::new();
            let h = hash_with("correct horse", &params, &mut mem).expect("hash");
            assert!(h.starts_with("$argon2id$v=19$"), "{h}");
            assert!(verify_with("correct horse", &h, &mut mem));
            assert!(!verify_with("wrong horse", &h, &mut mem));
            // Any argon2 implementation reads them: the crate's own verifier agrees.
            let parsed = PasswordHash::new(&h).expect("parses");
            assert!(
                Argon2::default()
                    .verify_password(b"correct horse", &parsed)
                    .is_ok()
            );
            assert!(!verify_with(
                "x",
                &decoy_hash(&cost).expect("decoy"),
                &mut mem
            ));
        }
        assert!(!verify_with("x", "not a hash", &mut Vec::new()));
        let bad = PasswordHashing {
            memory_kib: 1,
            iterations: 0,
            ..PasswordHashing::default()
        };
        assert!(bad.params().is_err());
    }

    #[test]
    fn a_hash_of_another_cost_still_verifies() {
        // Made with the crate's own hasher at a higher cost than the worker's buffer holds.
        use argon2::password_hash::PasswordHasher as _;
        let params = Params::new(256, 2, 1, None).expect("params");
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        let h = argon
            .hash_password(b"old password", &salt)
            .expect("hash")
            .to_string();
        let mut mem = vec![Block::default(); 8];
        assert!(verify_with("old password", &h, &mut mem));
        assert!(!verify_with("other", &h, &mut mem));
    }

    #[test]
    fn workers_fit_the_budget() {
        let c = PasswordHashing {
            workers: 64,
            memory_budget_mib: 100,
            ..PasswordHashing::default()
        };
        // 19 MiB each: 5 fit in 100 MiB.
        assert_eq!(c.effective_workers(), 5);
        assert_eq!(c.memory_bound_bytes(), 5 * 19 * 1024 * 1024);
        let tiny = PasswordHashing {
            memory_budget_mib: 1,
            ..c
        };
        assert_eq!(tiny.effective_workers(), 1, "always at least one");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = PasswordHasher::start(&PasswordHashing {
            memory_kib: 16 * 1024,
            iterations: 4,
            ..cheap()
        })
        .expect("pool");
        let pool = Arc::new(pool);
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.hash(format!("password {i}")).await })
            })
            .collect();
        let mut ok = 0;
        let mut busy = 0;
        for t in tasks {
            match t.await.expect("join") {
                Ok(h) => {
                    assert!(h.starts_with("$argon2id$"));
                    ok += 1;
                }
                Err(HashError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        // One worker and two waiting places: most of 32 at once are refused, none is lost.
        assert_eq!(ok + busy, 32);
        assert!(ok >= 1 && busy >= 20, "ok {ok}, busy {busy}");
        let h = pool.hash("afterwards".into()).await.expect("free again");
        assert!(pool.verify("afterwards".into(), h).await.expect("verify"));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_hash(&a).len(), 32);
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
