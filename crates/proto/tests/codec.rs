//! Property tests: every frame survives encode/decode unchanged, and arbitrary bytes never panic
//! the decoder.

use proptest::prelude::*;
use prost::Message as _;
use tern_proto::content::{Content, MediaRef};
use tern_proto::frames::*;

fn peer() -> impl Strategy<Value = Option<Peer>> {
    proptest::option::of(prop_oneof![
        any::<u64>().prop_map(Peer::user),
        any::<u64>().prop_map(Peer::group)
    ])
}

fn client_kind() -> impl Strategy<Value = client_frame::Kind> {
    prop_oneof![
        (any::<u32>(), ".{0,40}").prop_map(|(v, t)| client_frame::Kind::Hello(Hello {
            protocol_version: v,
            token: t
        })),
        (
            "[a-z0-9-]{0,64}",
            peer(),
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec(
                (
                    any::<u64>(),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
                ),
                0..8
            )
        )
            .prop_map(|(id, to, body, devs)| client_frame::Kind::Send(Send {
                client_msg_id: id,
                to,
                body,
                devices: devs
                    .into_iter()
                    .map(|(device_id, body)| DeviceBody { device_id, body })
                    .collect(),
            })),
        any::<u64>().prop_map(|up_to| client_frame::Kind::Ack(Ack { up_to })),
        (peer(), any::<u64>()).prop_map(|(conversation, up_to_seq)| client_frame::Kind::Read(
            Read {
                conversation,
                up_to_seq
            }
        )),
        any::<i64>().prop_map(|t| client_frame::Kind::Ping(Ping { client_time_ms: t })),
    ]
}

fn server_kind() -> impl Strategy<Value = server_frame::Kind> {
    let message = (
        peer(),
        ".{0,16}",
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(conversation, name, seq, user, dev, ts, body)| Message {
            conversation,
            peer_username: name.clone(),
            seq,
            sender_user: user,
            sender_username: name,
            sender_device: dev,
            client_msg_id: format!("c{seq}"),
            server_ts_ms: ts,
            body,
            kind: (seq % 2) as i32,
            group_name: format!("g{dev}"),
        });
    let receipt = (peer(), any::<u64>(), 0i32..3, any::<u64>(), any::<i64>()).prop_map(
        |(conversation, reader, kind, up_to_seq, ts)| Receipt {
            conversation,
            peer_username: "p".into(),
            reader_user: reader,
            reader_username: "r".into(),
            kind,
            up_to_seq,
            server_ts_ms: ts,
            all_delivered_up_to: up_to_seq / 2,
            all_read_up_to: up_to_seq / 3,
        },
    );
    prop_oneof![
        (any::<u64>(), message).prop_map(|(m, msg)| server_frame::Kind::Event(Event {
            mailbox_seq: m,
            kind: Some(event::Kind::Message(msg)),
        })),
        (any::<u64>(), receipt).prop_map(|(m, r)| server_frame::Kind::Event(Event {
            mailbox_seq: m,
            kind: Some(event::Kind::Receipt(r)),
        })),
        ("[a-z0-9]{1,20}", any::<u64>(), any::<i64>()).prop_map(|(id, seq, ts)| {
            server_frame::Kind::Sent(Sent {
                client_msg_id: id,
                seq,
                server_ts_ms: ts,
            })
        }),
        (
            1i32..19,
            ".{0,30}",
            proptest::collection::vec(any::<u64>(), 0..4),
            any::<u64>()
        )
            .prop_map(
                |(code, message, ids, retry_after_ms)| server_frame::Kind::Error(Error {
                    code,
                    message,
                    missing_devices: ids.clone(),
                    extra_devices: ids,
                    retry_after_ms,
                })
            ),
        any::<u64>().prop_map(|up_to| server_frame::Kind::Synced(Synced { up_to })),
        Just(server_frame::Kind::Done(Done {})),
    ]
}

proptest! {
    #[test]
    fn client_frames_round_trip(request_id in any::<u64>(), kind in client_kind()) {
        let frame = ClientFrame { request_id, kind: Some(kind) };
        let bytes = frame.encode_to_vec();
        let back = ClientFrame::decode_frame(&bytes, usize::MAX).expect("decodes");
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn server_frames_round_trip(request_id in any::<u64>(), kind in server_kind()) {
        let frame = ServerFrame { request_id, kind: Some(kind) };
        let bytes = frame.encode_to_vec();
        let back = ServerFrame::decode_frame(&bytes, usize::MAX).expect("decodes");
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn group_events_round_trip(
        action in 0i32..9,
        actor in proptest::option::of((any::<u64>(), "[a-z]{3,10}")),
        targets in proptest::collection::vec((any::<u64>(), "[a-z]{3,10}"), 0..5),
        name in ".{0,30}",
        members_can_add in any::<bool>(),
    ) {
        let user = |(user_id, username): (u64, String)| UserRef { user_id, username };
        let event = GroupEvent {
            action,
            actor: actor.map(user),
            targets: targets.into_iter().map(user).collect(),
            description: name.chars().rev().collect(),
            name,
            members_can_add,
        };
        prop_assert_eq!(GroupEvent::decode(&event.encode_to_vec()[..]).expect("decodes"), event);
    }

    #[test]
    fn contents_round_trip(
        text in ".{0,40}",
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        n in any::<u64>(),
        dims in any::<(u32, u32)>(),
    ) {
        let media = MediaRef {
            id: hex_like(&bytes),
            key: bytes.clone(),
            plaintext_sha256: bytes.iter().rev().copied().collect(),
            size: n,
            encrypted_size: n / 2,
            mime_type: text.clone(),
            file_name: text.chars().rev().collect(),
            thumbnail: bytes,
            width: dims.0,
            height: dims.1,
            caption: text.clone(),
        };
        for c in [Content::text(text), Content::media(media)] {
            prop_assert_eq!(Content::decode_body(&c.encode_body()).expect("decodes"), c);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ClientFrame::decode_frame(&bytes, 1024);
        let _ = ServerFrame::decode_frame(&bytes, 1024);
        let _ = Content::decode_body(&bytes);
    }

    #[test]
    fn oversized_frames_are_refused(extra in 1usize..100) {
        let frame = ClientFrame { request_id: 1, kind: Some(client_frame::Kind::Ping(Ping { client_time_ms: 5 })) };
        let bytes = frame.encode_to_vec();
        let limit = bytes.len().saturating_sub(extra.min(bytes.len()));
        if limit < bytes.len() {
            let refused = matches!(ClientFrame::decode_frame(&bytes, limit), Err(DecodeError::TooLarge { .. }));
            prop_assert!(refused);
        }
    }
}

fn hex_like(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn empty_frame_is_an_error() {
    let bytes = ClientFrame {
        request_id: 7,
        kind: None,
    }
    .encode_to_vec();
    assert!(matches!(
        ClientFrame::decode_frame(&bytes, 1024),
        Err(DecodeError::Empty)
    ));
}
