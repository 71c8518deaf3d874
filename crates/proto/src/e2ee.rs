//! End-to-end encryption envelopes (PROTOCOL.md §9.1): what a `Send.body` carries once bodies
//! are encrypted, and the plaintexts inside. The server stores and relays envelopes opaquely.
//! Hand-written `prost` structs, like [`crate::frames`].

use crate::content::Content;

/// The `Envelope.version` this crate writes and understands.
pub const CURRENT_ENVELOPE_VERSION: u32 = 1;

/// A message body as stored by the server: an Olm ciphertext for one device (direct messages
/// and device-to-device keys; each addressed device has its own body) or one Megolm
/// ciphertext for a whole group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "envelope::Kind", tags = "2, 3")]
    pub kind: Option<envelope::Kind>,
}

pub mod envelope {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Olm(super::OlmEnvelope),
        #[prost(message, tag = "3")]
        Megolm(super::MegolmEnvelope),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OlmEnvelope {
    /// The sending device's Curve25519 identity key (unpadded base64).
    #[prost(string, tag = "1")]
    pub sender_key: String,
    /// 0 = pre-key message (establishes a session), 1 = normal message.
    #[prost(uint32, tag = "2")]
    pub message_type: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MegolmEnvelope {
    /// The sending device's Curve25519 identity key.
    #[prost(string, tag = "1")]
    pub sender_key: String,
    #[prost(string, tag = "2")]
    pub session_id: String,
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
}

/// The plaintext of an Olm message. Sender and recipient are named inside the ciphertext, so
/// that the server can neither re-attribute a message nor hand it to another device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OlmPayload {
    #[prost(uint64, tag = "1")]
    pub sender_user: u64,
    #[prost(uint64, tag = "2")]
    pub sender_device: u64,
    #[prost(uint64, tag = "3")]
    pub recipient_user: u64,
    #[prost(uint64, tag = "4")]
    pub recipient_device: u64,
    /// The recipient device's Ed25519 identity key, as the sender saw it.
    #[prost(string, tag = "5")]
    pub recipient_ed25519: String,
    /// The user the message was sent to (`Send.to`): with the sender, it names the direct
    /// conversation, so that a copy cannot be filed under another one.
    #[prost(uint64, tag = "6")]
    pub to_user: u64,
    #[prost(oneof = "olm_payload::Body", tags = "10, 11")]
    pub body: Option<olm_payload::Body>,
}

pub mod olm_payload {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A direct message.
        #[prost(message, tag = "10")]
        Content(crate::content::Content),
        /// A group session key (never shown to the user).
        #[prost(message, tag = "11")]
        RoomKey(super::RoomKey),
    }
}

/// A Megolm session key for one group, sent device to device over Olm. `Debug` leaves the
/// key out.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct RoomKey {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    #[prost(string, tag = "2")]
    pub session_id: String,
    #[prost(bytes = "vec", tag = "3")]
    pub session_key: Vec<u8>,
}

impl std::fmt::Debug for RoomKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomKey")
            .field("group_id", &self.group_id)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

/// The plaintext of a Megolm message: bound to its group and sender.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupPayload {
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    #[prost(uint64, tag = "2")]
    pub sender_user: u64,
    #[prost(uint64, tag = "3")]
    pub sender_device: u64,
    #[prost(message, optional, tag = "4")]
    pub content: Option<Content>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn envelopes_round_trip_and_junk_is_an_error() {
        let e = Envelope {
            version: CURRENT_ENVELOPE_VERSION,
            kind: Some(envelope::Kind::Olm(OlmEnvelope {
                sender_key: "k".into(),
                message_type: 0,
                ciphertext: vec![1, 2, 3],
            })),
        };
        assert_eq!(
            Envelope::decode(e.encode_to_vec().as_slice()).expect("decode"),
            e
        );
        let p = OlmPayload {
            sender_user: 1,
            sender_device: 2,
            recipient_user: 3,
            recipient_device: 4,
            recipient_ed25519: "ed".into(),
            to_user: 3,
            body: Some(olm_payload::Body::RoomKey(RoomKey {
                group_id: 9,
                session_id: "s".into(),
                session_key: vec![7; 32],
            })),
        };
        assert_eq!(
            OlmPayload::decode(p.encode_to_vec().as_slice()).expect("decode"),
            p
        );
        assert!(
            !format!("{p:?}").contains("[7, 7"),
            "keys stay out of Debug"
        );
        assert!(Envelope::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
