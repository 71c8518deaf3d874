//! Accounts, sessions, devices, last seen, privacy and push: HTTP-only commands.

use std::io::{BufRead, IsTerminal};

use anyhow::Context;
use tern_client::{Client, PushKeys, Visibility};

use crate::args::{Credentials, DevicesAction, PrivacySetting, PushAction};
use crate::output::{Printer, cli_error};

/// The password from `--password-stdin`, `--password` or `TERN_PASSWORD`, never a prompt:
/// scripts must not hang waiting for a TTY.
fn password(c: &Credentials) -> anyhow::Result<String> {
    if c.password_stdin {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprint!("password (echoed): ");
        }
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        let pw = line.trim_end_matches(['\r', '\n']).to_owned();
        if pw.is_empty() {
            return Err(cli_error("invalid_input", "empty password on stdin"));
        }
        return Ok(pw);
    }
    c.password.clone().ok_or_else(|| {
        cli_error(
            "invalid_input",
            "no password: use --password-stdin or set TERN_PASSWORD",
        )
    })
}

pub async fn register(client: &Client, out: &Printer, c: &Credentials) -> anyhow::Result<()> {
    let pw = password(c)?;
    let session = client.register(&c.user, &pw).await?;
    out.session(&session);
    Ok(())
}

pub async fn login(client: &Client, out: &Printer, c: &Credentials) -> anyhow::Result<()> {
    let pw = password(c)?;
    let session = client.login(&c.user, &pw).await?;
    out.session(&session);
    Ok(())
}

pub async fn logout(client: &Client, out: &Printer) -> anyhow::Result<()> {
    let session = client.session().ok_or(tern_client::Error::NotLoggedIn)?;
    client.logout().await?;
    out.logged_out(&session.username);
    Ok(())
}

pub fn whoami(client: &Client, out: &Printer) -> anyhow::Result<()> {
    let session = client.session().ok_or(tern_client::Error::NotLoggedIn)?;
    out.session(&session);
    Ok(())
}

pub async fn devices(
    client: &Client,
    out: &Printer,
    action: Option<DevicesAction>,
) -> anyhow::Result<()> {
    match action {
        None => {
            for d in client.devices().await? {
                out.device(&d);
            }
        }
        Some(DevicesAction::Remove { id }) => {
            client.remove_device(id).await?;
            out.device_removed(id);
        }
    }
    Ok(())
}

/// `tern verify USER [--confirm]`.
pub async fn verify(
    client: &Client,
    out: &Printer,
    user: &str,
    confirm: bool,
) -> anyhow::Result<()> {
    let s = if confirm {
        client.mark_verified(user).await?
    } else {
        client.safety_number(user).await?
    };
    out.safety_number(&s);
    Ok(())
}

pub async fn last_seen(client: &Client, out: &Printer, user: &str) -> anyhow::Result<()> {
    let l = client.last_seen(user).await?;
    out.last_seen(&l);
    Ok(())
}

pub async fn privacy(
    client: &Client,
    out: &Printer,
    setting: Option<PrivacySetting>,
) -> anyhow::Result<()> {
    match setting {
        None | Some(PrivacySetting::LastSeen { value: None }) => {
            let p = client.privacy().await?;
            out.privacy(p.last_seen.as_str());
        }
        Some(PrivacySetting::LastSeen { value: Some(v) }) => {
            let vis = Visibility::parse(&v)
                .ok_or_else(|| cli_error("invalid_input", format!("unknown visibility {v:?}")))?;
            client.set_last_seen_privacy(vis).await?;
            out.privacy(vis.as_str());
        }
    }
    Ok(())
}

/// `tern push register|status|remove|decrypt|vapid`.
pub async fn push(client: &Client, out: &Printer, action: PushAction) -> anyhow::Result<()> {
    match action {
        PushAction::Register {
            endpoint,
            p256dh,
            auth,
        } => {
            let keys = match (p256dh, auth) {
                (Some(p256dh), Some(auth)) => Some(PushKeys { p256dh, auth }),
                _ => None,
            };
            let r = client.register_push(&endpoint, keys).await?;
            out.push_registration(Some(&r));
        }
        PushAction::Status => out.push_registration(client.push_status().await?.as_ref()),
        PushAction::Remove => {
            if !client.remove_push().await? {
                return Err(cli_error(
                    "not_found",
                    "this device has no push subscription",
                ));
            }
            out.push_registration(None);
        }
        PushAction::Decrypt { file } => {
            // One byte past the largest push, so that a longer input gets the SDK's error
            // without being read whole.
            let limit = tern_client::MAX_PUSH_BODY as u64 + 1;
            let mut body = Vec::new();
            match file {
                Some(path) => {
                    let f = std::fs::File::open(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    std::io::Read::read_to_end(&mut std::io::Read::take(f, limit), &mut body)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                }
                None => {
                    let stdin = std::io::stdin().lock();
                    std::io::Read::read_to_end(&mut std::io::Read::take(stdin, limit), &mut body)
                        .context("cannot read standard input")?;
                }
            }
            out.push_wake(&client.decrypt_push(&body).await?);
        }
        PushAction::Vapid => out.vapid(&client.vapid_public_key().await?),
    }
    Ok(())
}
