//! Frame codec micro-benchmarks: encoding and decoding the frames on the hot path (a `Send`
//! from a client, an `Event` carrying a message to a device).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use std::hint::black_box;
use tern_proto::frames::*;

fn send_frame(body: usize) -> ClientFrame {
    ClientFrame {
        request_id: 42,
        kind: Some(client_frame::Kind::Send(Send {
            client_msg_id: "3f4f9f244017676b4bc39b36358a9c83".into(),
            to: Some(Peer::user(1234)),
            body: vec![7; body],
            devices: (0..4)
                .map(|d| DeviceBody {
                    device_id: 100 + d,
                    body: None,
                })
                .collect(),
        })),
    }
}

fn event_frame(body: usize) -> ServerFrame {
    ServerFrame {
        request_id: 0,
        kind: Some(server_frame::Kind::Event(Event {
            mailbox_seq: 987_654,
            kind: Some(event::Kind::Message(Message {
                conversation: Some(Peer::user(99)),
                peer_username: "alice".into(),
                seq: 12_345,
                sender_user: 99,
                sender_username: "alice".into(),
                sender_device: 7,
                client_msg_id: "3f4f9f244017676b4bc39b36358a9c83".into(),
                server_ts_ms: 1_795_887_499_718,
                body: vec![7; body],
                kind: 0,
                group_name: String::new(),
            })),
        })),
    }
}

fn codec(c: &mut Criterion) {
    for body in [64usize, 1024, 16 * 1024] {
        let mut g = c.benchmark_group(format!("body {body} B"));
        let send = send_frame(body);
        let send_bytes = send.encode_to_vec();
        let event = event_frame(body);
        let event_bytes = event.encode_to_vec();
        g.throughput(Throughput::Elements(1));
        g.bench_function("encode Send", |b| {
            b.iter(|| black_box(&send).encode_to_vec())
        });
        g.bench_function("decode Send", |b| {
            b.iter(|| {
                ClientFrame::decode_frame(black_box(&send_bytes), 64 * 1024).expect("decodes")
            })
        });
        g.bench_function("encode Event", |b| {
            b.iter(|| black_box(&event).encode_to_vec())
        });
        g.bench_function("decode Event", |b| {
            b.iter(|| {
                ServerFrame::decode_frame(black_box(&event_bytes), 64 * 1024).expect("decodes")
            })
        });
        g.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
