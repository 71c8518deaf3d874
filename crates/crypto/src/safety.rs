//! Safety numbers: a 60-digit code two users compare (in person, or read out over a call) to
//! check that their clients encrypt for each other's real devices and nobody else's.
//!
//! Each user's half is a fingerprint of the user id and the sorted Ed25519 identity keys of all
//! its devices: SHA-512 iterated 5,200 times (Signal's construction, so that grinding a
//! colliding key costs as much there as here), of which 30 bytes become 30 digits. The two
//! halves are ordered so that both users see the same 60 digits. Any device added, removed or
//! replaced on either side changes the number.

use sha2::{Digest, Sha512};

const VERSION: u16 = 0;
const ITERATIONS: usize = 5200;

/// 30 digits for one user.
pub fn fingerprint(user_id: u64, ed25519_keys: &[String]) -> String {
    let mut keys: Vec<&str> = ed25519_keys.iter().map(String::as_str).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut identity = Vec::new();
    for k in &keys {
        identity.extend_from_slice(&(k.len() as u32).to_be_bytes());
        identity.extend_from_slice(k.as_bytes());
    }
    let mut hash = {
        let mut h = Sha512::new();
        h.update(VERSION.to_be_bytes());
        h.update(&identity);
        h.update(user_id.to_be_bytes());
        h.finalize().to_vec()
    };
    for _ in 1..ITERATIONS {
        let mut h = Sha512::new();
        h.update(&hash);
        h.update(&identity);
        hash = h.finalize().to_vec();
    }
    hash[..30]
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

/// The 60 digits both users see, in twelve groups of five.
pub fn safety_number(mine: (u64, &[String]), theirs: (u64, &[String])) -> String {
    let a = fingerprint(mine.0, mine.1);
    let b = fingerprint(theirs.0, theirs.1);
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let digits = format!("{lo}{hi}");
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_see_the_same_number_and_any_change_shows() {
        let alice = vec!["a1".to_owned(), "a2".to_owned()];
        let alice_reordered = vec!["a2".to_owned(), "a1".to_owned()];
        let bob = vec!["b1".to_owned()];
        let n = safety_number((1, &alice), (2, &bob));
        assert_eq!(n, safety_number((2, &bob), (1, &alice_reordered)));
        assert_eq!(n.len(), 60 + 11);
        assert!(
            n.split(' ')
                .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
        );
        let bob_new_device = vec!["b1".to_owned(), "b2".to_owned()];
        assert_ne!(n, safety_number((1, &alice), (2, &bob_new_device)));
        assert_ne!(
            n,
            safety_number((1, &alice), (3, &bob)),
            "bound to the user id"
        );
    }
}
