//! Message content (PROTOCOL.md §8.5): what a `Send.body` carries between SDKs. The server
//! never parses it. Hand-written `prost` structs, like [`crate::frames`].

use prost::Message as _;

/// The `Content.version` this crate writes and understands.
pub const CURRENT_CONTENT_VERSION: u32 = 1;

/// A message body: a text or a media reference.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Content {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(oneof = "body::Body", tags = "2, 3")]
    pub body: Option<body::Body>,
}

/// The oneof of [`Content`].
pub mod body {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(string, tag = "2")]
        Text(String),
        #[prost(message, tag = "3")]
        Media(super::MediaRef),
    }
}

/// An encrypted media object (PROTOCOL.md §8.4) and everything needed to fetch, decrypt,
/// verify and show it. `Debug` leaves the key out.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct MediaRef {
    /// Lowercase hex SHA-256 of the ciphertext: the object to download.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The 32-byte media key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub plaintext_sha256: Vec<u8>,
    /// Plaintext bytes.
    #[prost(uint64, tag = "4")]
    pub size: u64,
    /// Ciphertext bytes.
    #[prost(uint64, tag = "5")]
    pub encrypted_size: u64,
    #[prost(string, tag = "6")]
    pub mime_type: String,
    /// Base name only; receivers must sanitise it anyway.
    #[prost(string, tag = "7")]
    pub file_name: String,
    /// Images: a small JPEG (at most 64x64).
    #[prost(bytes = "vec", tag = "8")]
    pub thumbnail: Vec<u8>,
    /// Images, when known.
    #[prost(uint32, tag = "9")]
    pub width: u32,
    #[prost(uint32, tag = "10")]
    pub height: u32,
    #[prost(string, tag = "11")]
    pub caption: String,
}

impl std::fmt::Debug for MediaRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaRef")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .field("size", &self.size)
            .field("encrypted_size", &self.encrypted_size)
            .field("mime_type", &self.mime_type)
            .field("file_name", &self.file_name)
            .field("thumbnail_bytes", &self.thumbnail.len())
            .field("width", &self.width)
            .field("height", &self.height)
            .field("caption", &self.caption)
            .finish_non_exhaustive()
    }
}

/// Why a body is not readable [`Content`].
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("malformed content: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("content version {0} is not supported")]
    UnsupportedVersion(u32),
    #[error("content has no body")]
    Empty,
}

impl Content {
    pub fn text(text: impl Into<String>) -> Content {
        Content {
            version: CURRENT_CONTENT_VERSION,
            body: Some(body::Body::Text(text.into())),
        }
    }

    pub fn media(media: MediaRef) -> Content {
        Content {
            version: CURRENT_CONTENT_VERSION,
            body: Some(body::Body::Media(media)),
        }
    }

    pub fn encode_body(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes a message body. Never panics; refuses unknown versions and bodies without
    /// content (a newer sender's body kind reads as empty here).
    pub fn decode_body(buf: &[u8]) -> Result<Content, ContentError> {
        let c = Content::decode(buf)?;
        if c.version != CURRENT_CONTENT_VERSION {
            return Err(ContentError::UnsupportedVersion(c.version));
        }
        if c.body.is_none() {
            return Err(ContentError::Empty);
        }
        Ok(c)
    }

    /// The text, for a text body.
    pub fn as_text(&self) -> Option<&str> {
        match &self.body {
            Some(body::Body::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// The media reference, for a media body.
    pub fn as_media(&self) -> Option<&MediaRef> {
        match &self.body {
            Some(body::Body::Media(m)) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> MediaRef {
        MediaRef {
            id: "ab".repeat(32),
            key: vec![7; 32],
            plaintext_sha256: vec![9; 32],
            size: 1_234_567,
            encrypted_size: 1_234_567 + 28 + 19 * 16,
            mime_type: "image/jpeg".into(),
            file_name: "photo.jpg".into(),
            thumbnail: vec![0xff, 0xd8, 0xff],
            width: 4032,
            height: 3024,
            caption: "sunset".into(),
        }
    }

    #[test]
    fn text_and_media_round_trip() {
        for c in [Content::text("hi ✓"), Content::media(photo())] {
            let bytes = c.encode_body();
            assert_eq!(Content::decode_body(&bytes).expect("decode"), c);
        }
        assert_eq!(
            Content::decode_body(&Content::text("x").encode_body())
                .expect("decode")
                .as_text(),
            Some("x")
        );
        let m = Content::decode_body(&Content::media(photo()).encode_body()).expect("decode");
        assert_eq!(m.as_media(), Some(&photo()));
        assert_eq!(m.as_text(), None);
    }

    #[test]
    fn wire_tags_match_the_protocol() {
        // version = 1 (field 1, varint), text = "a" (field 2, length-delimited).
        assert_eq!(
            Content::text("a").encode_body(),
            [0x08, 0x01, 0x12, 0x01, b'a']
        );
        let media = Content::media(MediaRef {
            caption: "c".into(),
            ..Default::default()
        })
        .encode_body();
        // media (field 3) holding caption (field 11: tag 0x5a).
        assert_eq!(media, [0x08, 0x01, 0x1a, 0x03, 0x5a, 0x01, b'c']);
    }

    #[test]
    fn debug_leaves_the_key_out() {
        let m = MediaRef {
            key: vec![0xab; 32],
            ..photo()
        };
        let shown = format!("{m:?}");
        assert!(shown.contains("photo.jpg") && shown.contains("redacted"));
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn unreadable_bodies_are_errors_not_panics() {
        assert!(matches!(
            Content::decode_body(&[0xff, 0xff, 0xff]),
            Err(ContentError::Malformed(_))
        ));
        // Plain UTF-8 text from before Content.
        assert!(Content::decode_body(b"hello there").is_err());
        assert!(matches!(
            Content::decode_body(&[]),
            Err(ContentError::UnsupportedVersion(0))
        ));
        let v2 = Content {
            version: 2,
            body: Some(body::Body::Text("x".into())),
        };
        assert!(matches!(
            Content::decode_body(&v2.encode_to_vec()),
            Err(ContentError::UnsupportedVersion(2))
        ));
        // A body kind this version does not know (field 4) decodes to no body.
        assert!(matches!(
            Content::decode_body(&[0x08, 0x01, 0x22, 0x00]),
            Err(ContentError::Empty)
        ));
    }
}
