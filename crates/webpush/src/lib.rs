//! Web Push without I/O, both directions:
//!
//! - [`encrypt`] / [`Receiver::decrypt`]: RFC 8291 message encryption, the `aes128gcm`
//!   content coding of RFC 8188 with one record, keyed by the subscription's `p256dh` (the
//!   receiver's P-256 public key) and `auth` (a 16-byte secret);
//! - [`Vapid::authorization`] / [`verify_vapid`]: RFC 8292 VAPID, an ES256 JWT (`aud` = the
//!   push service's origin, `exp`, `sub`) and the server's public key in the `Authorization`
//!   header (`vapid t=…, k=…`).
//!
//! The server encrypts and signs; a device (or a test playing the push service) decrypts and
//! verifies. Keys and secrets never appear in `Debug` output.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hkdf::Hkdf;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The record size tern announces: the whole message is one record of at most this size.
const RECORD_SIZE: u32 = 4096;
/// Salt (16), record size (4), key id length (1), key id (65).
const HEADER: usize = 86;
/// Bytes of AES-GCM tag.
const TAG: usize = 16;
/// The most plaintext one message carries (RFC 8291 §4: 4096-byte bodies).
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - HEADER - TAG - 1;
/// Length of an uncompressed P-256 point (`p256dh`, the VAPID public key).
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of the `auth` secret.
pub const AUTH_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("p256dh is not an uncompressed P-256 public key (65 bytes, a point on the curve)")]
    BadPublicKey,
    #[error("auth must be 16 bytes")]
    BadAuth,
    #[error("a push message carries at most {MAX_PLAINTEXT} bytes")]
    TooLong,
    #[error("not an aes128gcm message for this receiver")]
    Undecryptable,
    #[error("not a valid VAPID authorization: {0}")]
    BadVapid(&'static str),
    #[error("a VAPID private key is 32 bytes of a valid P-256 scalar")]
    BadPrivateKey,
    #[error("the system's random generator failed")]
    Random,
}

fn public_key(p256dh: &[u8]) -> Result<PublicKey, Error> {
    if p256dh.len() != PUBLIC_KEY_LEN || p256dh[0] != 4 {
        return Err(Error::BadPublicKey);
    }
    PublicKey::from_sec1_bytes(p256dh).map_err(|_| Error::BadPublicKey)
}

fn uncompressed(key: &PublicKey) -> Vec<u8> {
    key.to_sec1_point(false).as_bytes().to_vec()
}

/// Checks a subscription's keys as a device gave them.
pub fn check_keys(p256dh: &[u8], auth: &[u8]) -> Result<(), Error> {
    public_key(p256dh)?;
    if auth.len() != AUTH_LEN {
        return Err(Error::BadAuth);
    }
    Ok(())
}

/// A fresh P-256 secret key (from the operating system's generator, through `rand`).
fn random_secret() -> SecretKey {
    loop {
        // A random 32-byte string is a valid scalar but for ~2^-32 of them.
        if let Ok(k) = SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
            return k;
        }
    }
}

/// The content-encryption key and nonce of RFC 8291 §3.4 (and RFC 8188 §2.2).
fn derive(
    auth: &[u8],
    shared: &[u8],
    receiver: &[u8],
    sender: &[u8],
    salt: &[u8],
) -> ([u8; 16], [u8; 12]) {
    let mut info = b"WebPush: info\0".to_vec();
    info.extend_from_slice(receiver);
    info.extend_from_slice(sender);
    let mut ikm = [0u8; 32];
    // Output lengths of 32, 16 and 12 bytes are far below HKDF-SHA256's limit: these never fail.
    let _ = Hkdf::<Sha256>::new(Some(auth), shared).expand(&info, &mut ikm);
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    let _ = prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek);
    let _ = prk.expand(b"Content-Encoding: nonce\0", &mut nonce);
    (cek, nonce)
}

/// Encrypts `plaintext` for the subscription (`p256dh`, `auth`): the body of a Web Push
/// request with `Content-Encoding: aes128gcm`. A fresh key pair and salt every time.
pub fn encrypt(p256dh: &[u8], auth: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    check_keys(p256dh, auth)?;
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(Error::TooLong);
    }
    let rng = ring::rand::SystemRandom::new();
    let sender = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| Error::Random)?;
    let sender_public = sender.compute_public_key().map_err(|_| Error::Random)?;
    let sender_public = sender_public.as_ref().to_vec();
    let shared = agree_ephemeral(sender, &UnparsedPublicKey::new(&ECDH_P256, p256dh), |s| {
        s.to_vec()
    })
    .map_err(|_| Error::BadPublicKey)?;
    seal(
        p256dh,
        auth,
        plaintext,
        rand::random(),
        &sender_public,
        &shared,
    )
}

/// [`encrypt`] with a given salt and sender key (RFC 8291's example).
#[cfg(test)]
fn encrypt_with(
    p256dh: &[u8],
    auth: &[u8],
    plaintext: &[u8],
    salt: [u8; 16],
    sender: &SecretKey,
) -> Result<Vec<u8>, Error> {
    check_keys(p256dh, auth)?;
    let receiver = public_key(p256dh)?;
    let shared = p256::ecdh::diffie_hellman(sender.to_nonzero_scalar(), receiver.as_affine());
    let sender_public = uncompressed(&sender.public_key());
    seal(
        p256dh,
        auth,
        plaintext,
        salt,
        &sender_public,
        shared.raw_secret_bytes().as_slice(),
    )
}

/// The body, from the agreed secret.
fn seal(
    p256dh: &[u8],
    auth: &[u8],
    plaintext: &[u8],
    salt: [u8; 16],
    sender_public: &[u8],
    shared: &[u8],
) -> Result<Vec<u8>, Error> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(Error::TooLong);
    }
    let (cek, nonce) = derive(auth, shared, p256dh, sender_public, &salt);
    // One record, the last: the plaintext, then the delimiter 2, no padding.
    let mut record = Vec::with_capacity(plaintext.len() + 1 + TAG);
    record.extend_from_slice(plaintext);
    record.push(2);
    let sealed = Aes128Gcm::new(&Key::<Aes128Gcm>::from(cek))
        .encrypt(&Nonce::from(nonce), record.as_slice())
        .map_err(|_| Error::TooLong)?;
    let mut body = Vec::with_capacity(HEADER + sealed.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(PUBLIC_KEY_LEN as u8);
    body.extend_from_slice(sender_public);
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// The receiving side of a subscription: what a device keeps, and a test push service uses.
pub struct Receiver {
    secret: SecretKey,
    auth: [u8; AUTH_LEN],
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl Receiver {
    /// New keys for a new subscription.
    pub fn generate() -> Receiver {
        Receiver {
            secret: random_secret(),
            auth: rand::random(),
        }
    }

    /// Keys kept from before: the 32-byte private scalar and the auth secret.
    pub fn from_parts(secret: &[u8], auth: &[u8]) -> Result<Receiver, Error> {
        Ok(Receiver {
            secret: SecretKey::from_slice(secret).map_err(|_| Error::BadPrivateKey)?,
            auth: auth.try_into().map_err(|_| Error::BadAuth)?,
        })
    }

    /// The private scalar, to keep (32 bytes).
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.secret.to_bytes().to_vec()
    }

    /// `keys.p256dh`: the public key, uncompressed (65 bytes).
    pub fn p256dh(&self) -> Vec<u8> {
        uncompressed(&self.secret.public_key())
    }

    /// `keys.auth` (16 bytes).
    pub fn auth(&self) -> [u8; AUTH_LEN] {
        self.auth
    }

    /// The plaintext of an `aes128gcm` push body sent to this subscription.
    pub fn decrypt(&self, body: &[u8]) -> Result<Vec<u8>, Error> {
        if body.len() < HEADER + TAG + 1 || body[20] as usize != PUBLIC_KEY_LEN {
            return Err(Error::Undecryptable);
        }
        let (salt, sender, sealed) = (&body[..16], &body[21..HEADER], &body[HEADER..]);
        let record_size = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
        if sealed.len() > record_size {
            // More than one record: tern sends one, and so does every push sender it knows.
            return Err(Error::Undecryptable);
        }
        let sender_key = public_key(sender).map_err(|_| Error::Undecryptable)?;
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender_key.as_affine());
        let (cek, nonce) = derive(
            &self.auth,
            shared.raw_secret_bytes().as_slice(),
            &self.p256dh(),
            sender,
            salt,
        );
        let mut record = Aes128Gcm::new(&Key::<Aes128Gcm>::from(cek))
            .decrypt(&Nonce::from(nonce), sealed)
            .map_err(|_| Error::Undecryptable)?;
        // Padding is zeros after the delimiter, which is 2 in the last record.
        while record.last() == Some(&0) {
            record.pop();
        }
        if record.pop() != Some(2) {
            return Err(Error::Undecryptable);
        }
        Ok(record)
    }
}

/// The server's VAPID key pair (RFC 8292).
pub struct Vapid {
    key: SigningKey,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public_key", &self.public_key_b64())
            .finish_non_exhaustive()
    }
}

/// The claims of a VAPID JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The push service's origin, `scheme://host[:port]`.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch (at most 24 hours ahead).
    pub exp: u64,
    /// A contact for the push service's operator: `mailto:` or an `https:` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

impl Vapid {
    /// A new key pair.
    pub fn generate() -> Vapid {
        Vapid {
            key: SigningKey::from(random_secret()),
        }
    }

    /// The key pair of a kept private scalar (32 bytes).
    pub fn from_bytes(secret: &[u8]) -> Result<Vapid, Error> {
        let secret = SecretKey::from_slice(secret).map_err(|_| Error::BadPrivateKey)?;
        Ok(Vapid {
            key: SigningKey::from(secret),
        })
    }

    /// The private scalar, to keep (32 bytes).
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.key.to_bytes().to_vec()
    }

    /// The public key, uncompressed (65 bytes): a browser's `applicationServerKey`.
    pub fn public_key(&self) -> Vec<u8> {
        self.key
            .verifying_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    }

    /// [`Vapid::public_key`] in unpadded base64url, as `k=` and browsers take it.
    pub fn public_key_b64(&self) -> String {
        B64.encode(self.public_key())
    }

    /// The `Authorization` header for a request to a push service at `claims.aud`.
    pub fn authorization(&self, claims: &Claims) -> String {
        let header = B64.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        // Serializing a struct of strings and a number does not fail.
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let input = format!("{header}.{body}");
        let signature: Signature = self.key.sign(input.as_bytes());
        format!(
            "vapid t={input}.{}, k={}",
            B64.encode(signature.to_bytes()),
            self.public_key_b64()
        )
    }
}

/// Checks a `vapid t=…, k=…` authorization: the JWT's ES256 signature by the key `k`. Returns
/// the key and the claims (the caller checks `aud`, `exp` and `sub` against what it expects).
pub fn verify_vapid(authorization: &str) -> Result<(Vec<u8>, Claims), Error> {
    let rest = authorization
        .strip_prefix("vapid ")
        .ok_or(Error::BadVapid("not the vapid scheme"))?;
    let (mut token, mut key) = (None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(t) = part.strip_prefix("t=") {
            token = Some(t);
        } else if let Some(k) = part.strip_prefix("k=") {
            key = Some(k);
        }
    }
    let (token, key) = (
        token.ok_or(Error::BadVapid("no t="))?,
        key.ok_or(Error::BadVapid("no k="))?,
    );
    let key = B64
        .decode(key)
        .map_err(|_| Error::BadVapid("k is not base64url"))?;
    let verifying =
        VerifyingKey::from_sec1_bytes(&key).map_err(|_| Error::BadVapid("k is not a P-256 key"))?;
    let (input, signature) = token.rsplit_once('.').ok_or(Error::BadVapid("not a JWT"))?;
    let signature = B64
        .decode(signature)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
        .ok_or(Error::BadVapid("a malformed signature"))?;
    verifying
        .verify(input.as_bytes(), &signature)
        .map_err(|_| Error::BadVapid("the signature does not verify"))?;
    let (header, body) = input.split_once('.').ok_or(Error::BadVapid("not a JWT"))?;
    let header: serde_json::Value = B64
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(Error::BadVapid("a malformed header"))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
        return Err(Error::BadVapid("alg is not ES256"));
    }
    let claims: Claims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Error::BadVapid("malformed claims"))?;
    Ok((key, claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        B64.decode(s).expect("base64url")
    }

    // RFC 8291, Appendix A.
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    #[test]
    fn rfc8291_appendix_a_both_ways() {
        let sender = SecretKey::from_slice(&b64(AS_PRIVATE)).expect("sender key");
        let salt: [u8; 16] = b64(SALT).try_into().expect("salt");
        let body = encrypt_with(
            &b64(UA_PUBLIC),
            &b64(AUTH),
            PLAINTEXT.as_bytes(),
            salt,
            &sender,
        )
        .expect("encrypt");
        assert_eq!(B64.encode(&body), BODY);
        let receiver = Receiver::from_parts(&b64(UA_PRIVATE), &b64(AUTH)).expect("receiver");
        assert_eq!(receiver.p256dh(), b64(UA_PUBLIC));
        assert_eq!(
            receiver.decrypt(&b64(BODY)).expect("decrypt"),
            PLAINTEXT.as_bytes()
        );
    }

    #[test]
    fn round_trip_with_fresh_keys_and_refusals() {
        let r = Receiver::generate();
        let body = encrypt(&r.p256dh(), &r.auth(), b"{\"n\":1}").expect("encrypt");
        assert_eq!(r.decrypt(&body).expect("decrypt"), b"{\"n\":1}");
        let again = encrypt(&r.p256dh(), &r.auth(), b"{\"n\":1}").expect("encrypt");
        assert_ne!(body, again, "a fresh salt and key every time");
        // Someone else's subscription, a flipped bit, a truncation: refused.
        assert_eq!(
            Receiver::generate().decrypt(&body),
            Err(Error::Undecryptable)
        );
        let mut bad = body.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(r.decrypt(&bad), Err(Error::Undecryptable));
        assert_eq!(r.decrypt(&body[..40]), Err(Error::Undecryptable));
        // The largest message fits one 4096-byte record; one byte more is refused.
        let big = vec![7u8; MAX_PLAINTEXT];
        let body = encrypt(&r.p256dh(), &r.auth(), &big).expect("largest");
        assert_eq!(body.len(), RECORD_SIZE as usize);
        assert_eq!(r.decrypt(&body).expect("decrypt"), big);
        assert_eq!(
            encrypt(&r.p256dh(), &r.auth(), &[0; MAX_PLAINTEXT + 1]),
            Err(Error::TooLong)
        );
        // Bad keys.
        assert_eq!(encrypt(&[4; 65], &r.auth(), b"x"), Err(Error::BadPublicKey));
        assert_eq!(
            encrypt(&r.p256dh()[..33], &r.auth(), b"x"),
            Err(Error::BadPublicKey)
        );
        assert_eq!(encrypt(&r.p256dh(), &[1; 15], b"x"), Err(Error::BadAuth));
    }

    #[test]
    fn vapid_signs_and_verifies() {
        let v = Vapid::generate();
        let claims = Claims {
            aud: "https://push.example:8443".into(),
            exp: 1_800_000_000,
            sub: Some("mailto:ops@example.org".into()),
        };
        let header = v.authorization(&claims);
        let (key, got) = verify_vapid(&header).expect("verifies");
        assert_eq!((key, got), (v.public_key(), claims.clone()));
        assert_eq!(v.public_key().len(), PUBLIC_KEY_LEN);
        // Kept and loaded again: the same key.
        let kept = Vapid::from_bytes(&v.secret_bytes()).expect("load");
        assert_eq!(kept.public_key(), v.public_key());
        // Another key's signature under this k, or changed claims: refused.
        let other = Vapid::generate().authorization(&claims);
        let (t, _) = other.split_once(", k=").expect("shape");
        let forged = format!("{t}, k={}", v.public_key_b64());
        assert!(verify_vapid(&forged).is_err());
        let (t, k) = header.split_once(", k=").expect("shape");
        let (head, rest) = t.split_once('.').expect("jwt");
        let (_, sig) = rest.split_once('.').expect("jwt");
        let changed = B64.encode(br#"{"aud":"https://evil.example","exp":1800000000}"#);
        assert!(verify_vapid(&format!("{head}.{changed}.{sig}, k={k}")).is_err());
        assert!(verify_vapid("Bearer abc").is_err());
        assert!(Vapid::from_bytes(&[0; 32]).is_err(), "zero is no scalar");
    }
}
