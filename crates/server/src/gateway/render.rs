//! Turns stored mailbox entries into `Event` frames as one device sees them: a direct
//! conversation is named by the *other* participant (PROTOCOL.md §3.1, `Peer`).

use tern_proto::frames::{self, Event, Peer, ServerFrame, event, server_frame};
use tern_store::{MailboxEntry, MailboxItem, ReceiptKind, UserId};

pub fn event_frame(entry: &MailboxEntry, me: UserId) -> ServerFrame {
    let kind = match &entry.item {
        MailboxItem::Message(m) => {
            let peer = m.conversation.peer_of(me);
            let sender = m
                .conversation
                .user(m.sender_user)
                .map(|u| u.username.clone())
                .unwrap_or_default();
            event::Kind::Message(frames::Message {
                conversation: Some(Peer::user(peer.id)),
                peer_username: peer.username.clone(),
                seq: m.seq,
                sender_user: m.sender_user,
                sender_username: sender,
                sender_device: m.sender_device,
                client_msg_id: m.client_msg_id.clone(),
                server_ts_ms: m.server_ts_ms,
                body: m.body.to_vec(),
            })
        }
        MailboxItem::Receipt(r) => {
            let peer = r.conversation.peer_of(me);
            let reader = r
                .conversation
                .user(r.reader)
                .map(|u| u.username.clone())
                .unwrap_or_default();
            event::Kind::Receipt(frames::Receipt {
                conversation: Some(Peer::user(peer.id)),
                peer_username: peer.username.clone(),
                reader_user: r.reader,
                reader_username: reader,
                kind: match r.kind {
                    ReceiptKind::Delivered => frames::ReceiptKind::Delivered as i32,
                    ReceiptKind::Read => frames::ReceiptKind::Read as i32,
                },
                up_to_seq: r.up_to_seq,
                server_ts_ms: r.ts_ms,
            })
        }
    };
    ServerFrame {
        request_id: 0,
        kind: Some(server_frame::Kind::Event(Event {
            mailbox_seq: entry.mseq,
            kind: Some(kind),
        })),
    }
}
