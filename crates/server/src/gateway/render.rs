//! Turns stored mailbox entries into `Event` frames as one device sees them: a direct
//! conversation is named by the *other* participant (PROTOCOL.md §3.1, `Peer`), a group by its id.

use tern_proto::frames::{self, Event, Peer, ServerFrame, event, server_frame};
use tern_store::{Conversation, MailboxEntry, MailboxItem, MessageKind, ReceiptKind, UserId};

/// (peer, peer username, group name) of a conversation as `me` sees it.
fn view(c: &Conversation, me: UserId) -> (Peer, String, String) {
    match c {
        Conversation::Direct { lo, hi } => {
            let peer = if lo.id == me { hi } else { lo };
            (Peer::user(peer.id), peer.username.clone(), String::new())
        }
        Conversation::Group { id, name } => (Peer::group(*id), String::new(), name.clone()),
    }
}

pub fn event_frame(entry: &MailboxEntry, me: UserId) -> ServerFrame {
    let kind = match &entry.item {
        MailboxItem::Message(m) => {
            let (peer, peer_username, group_name) = view(&m.conversation, me);
            event::Kind::Message(frames::Message {
                conversation: Some(peer),
                peer_username,
                seq: m.seq,
                sender_user: m.sender_user,
                sender_username: m.sender_username.clone(),
                sender_device: m.sender_device,
                client_msg_id: m.client_msg_id.clone(),
                server_ts_ms: m.server_ts_ms,
                body: m.body.to_vec(),
                kind: match m.kind {
                    MessageKind::User => frames::MessageKind::User as i32,
                    MessageKind::System => frames::MessageKind::System as i32,
                },
                group_name,
            })
        }
        MailboxItem::Receipt(r) => {
            let (peer, peer_username, _) = view(&r.conversation, me);
            event::Kind::Receipt(frames::Receipt {
                conversation: Some(peer),
                peer_username,
                reader_user: r.reader,
                reader_username: r.reader_username.clone(),
                kind: match r.kind {
                    ReceiptKind::Delivered => frames::ReceiptKind::Delivered as i32,
                    ReceiptKind::Read => frames::ReceiptKind::Read as i32,
                },
                up_to_seq: r.up_to_seq,
                server_ts_ms: r.ts_ms,
                all_delivered_up_to: r.all_delivered_up_to,
                all_read_up_to: r.all_read_up_to,
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
