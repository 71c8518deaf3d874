//! Pure input checks shared by the server (which enforces them) and clients (which can fail
//! early with the same words).

use crate::limits::*;

/// Checks a username: 3–32 characters of `a-z`, `0-9`, `_`, `.`, `-`, starting with a letter.
/// Usernames are case-insensitive: callers lowercase before checking.
pub fn username(name: &str) -> Result<(), String> {
    if !(USERNAME_MIN..=USERNAME_MAX).contains(&name.len()) {
        return Err(format!(
            "username must be {USERNAME_MIN} to {USERNAME_MAX} characters"
        ));
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_lowercase()) {
        return Err("username must start with a letter a-z".into());
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
    {
        return Err("username may contain only a-z, 0-9, '_', '.' and '-'".into());
    }
    Ok(())
}

/// Checks a password's length and that it is not trivially weak.
pub fn password(pw: &str, username: &str) -> Result<(), String> {
    if pw.len() < PASSWORD_MIN {
        return Err(format!(
            "password must be at least {PASSWORD_MIN} characters"
        ));
    }
    if pw.len() > PASSWORD_MAX {
        return Err(format!("password must be at most {PASSWORD_MAX} bytes"));
    }
    if pw.eq_ignore_ascii_case(username) {
        return Err("password must not be the username".into());
    }
    let first = pw.chars().next();
    if pw.chars().all(|c| Some(c) == first) {
        return Err("password must not be one repeated character".into());
    }
    Ok(())
}

/// Checks a device name.
pub fn device_name(name: &str) -> Result<(), String> {
    if name.len() > DEVICE_NAME_MAX {
        return Err(format!(
            "device name must be at most {DEVICE_NAME_MAX} bytes"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("device name must not contain control characters".into());
    }
    Ok(())
}

/// Checks a group name: 1–100 bytes, no control characters, not only spaces.
pub fn group_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("group name must not be empty".into());
    }
    if name.len() > GROUP_NAME_MAX {
        return Err(format!("group name must be at most {GROUP_NAME_MAX} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err("group name must not contain control characters".into());
    }
    Ok(())
}

/// Checks a group description: at most 512 bytes; line breaks allowed, other control
/// characters not.
pub fn group_description(text: &str) -> Result<(), String> {
    if text.len() > GROUP_DESCRIPTION_MAX {
        return Err(format!(
            "group description must be at most {GROUP_DESCRIPTION_MAX} bytes"
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err("group description must not contain control characters".into());
    }
    Ok(())
}

/// Checks a client message id: 1–64 bytes of printable ASCII.
pub fn client_msg_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_BYTES {
        return Err(format!(
            "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_BYTES} bytes"
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("client_msg_id must be printable ASCII".into());
    }
    Ok(())
}

/// Longest key, signature or key id text the key directory stores (a Curve25519 key is 43
/// characters of base64, an Ed25519 signature 86).
pub const KEY_TEXT_MAX: usize = 128;

/// A public key, signature or key id as published to the key directory: 1–128 characters of
/// base64 (standard or URL-safe alphabet, padding allowed). The server stores keys opaquely;
/// this only bounds what it stores.
pub fn key_text(what: &str, text: &str) -> Result<(), String> {
    let ok = !text.is_empty()
        && text.len() <= KEY_TEXT_MAX
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'='));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1-{KEY_TEXT_MAX} characters of base64"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in [
            "alice",
            "bob_2",
            "a.b-c",
            "abc",
            "a234567890123456789012345678901z",
        ] {
            assert_eq!(username(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "1abc",
            "_abc",
            "al ice",
            "alice!",
            "ä-user",
            &"a".repeat(33),
        ] {
            assert!(username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(password("correct horse", "alice").is_ok());
        assert!(password("short", "alice").is_err());
        assert!(password("aaaaaaaaaaaa", "alice").is_err());
        assert!(password("alicealice", "alicealice").is_err());
        assert!(password(&"x".repeat(PASSWORD_MAX + 1), "alice").is_err());
    }

    #[test]
    fn group_names() {
        assert!(group_name("Family 👪").is_ok());
        assert!(group_name("   ").is_err());
        assert!(group_name("a\nb").is_err());
        assert!(group_name(&"x".repeat(101)).is_err());
        assert!(group_description("").is_ok());
        assert!(group_description("line one\nline two").is_ok());
        assert!(group_description("bell\u{7}").is_err());
        assert!(group_description(&"x".repeat(513)).is_err());
    }

    #[test]
    fn client_msg_ids() {
        assert!(client_msg_id("m-1").is_ok());
        assert!(client_msg_id("").is_err());
        assert!(client_msg_id("with space").is_err());
        assert!(client_msg_id(&"x".repeat(65)).is_err());
    }
}
