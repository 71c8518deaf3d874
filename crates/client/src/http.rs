//! The HTTP half of the protocol (accounts, sessions, devices, users, settings, groups; media
//! is in `media/tus.rs`): thin typed calls over `reqwest`, with the server's
//! `{"error": {...}}` bodies mapped to [`Error::Server`] so callers see the protocol's
//! [`ErrorCode`].

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_proto::ErrorCode;
use tern_proto::http::{
    AddMembersRequest, ClaimRequest, ClaimResponse, CreateGroupRequest, DeviceInfo,
    DevicesResponse, ErrorBody, GroupInfo, GroupKeys, GroupSummary, GroupsResponse, KeyCounts,
    KeysUpload, LastSeenResponse, LoginRequest, LoginResponse, MessageInfo, PrivacySettings,
    PushSubscriptionRequest, PushSubscriptionResponse, RegisterRequest, RegisterResponse,
    TurnCredentials, UpdateGroupRequest, UserKeys, VapidResponse,
};

use crate::error::Error;

/// Longest error body we read; the server's are tiny, a proxy's HTML page may not be.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub fn new(base: &str, timeout: Duration) -> Result<Http, Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // Below the server's header timeout (10 s by default), which closes idle
            // keep-alive connections: a request must not go out on one being closed.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Network(format!("cannot build HTTP client: {e}")))?;
        Ok(Http {
            client,
            base: base.to_owned(),
        })
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let rb = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn register(
        &self,
        username: &str,
        password: &str,
    ) -> Result<RegisterResponse, Error> {
        let body = RegisterRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        };
        json(self.request(Method::POST, "/v1/accounts", None).json(&body)).await
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_name: &str,
    ) -> Result<LoginResponse, Error> {
        let body = LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
            device_name: device_name.to_owned(),
        };
        json(self.request(Method::POST, "/v1/sessions", None).json(&body)).await
    }

    pub async fn logout(&self, token: &str) -> Result<(), Error> {
        empty(self.request(Method::DELETE, "/v1/sessions/current", Some(token))).await
    }

    pub async fn devices(&self, token: &str) -> Result<Vec<DeviceInfo>, Error> {
        let r: DevicesResponse =
            json(self.request(Method::GET, "/v1/devices", Some(token))).await?;
        Ok(r.devices)
    }

    pub async fn remove_device(&self, token: &str, device_id: u64) -> Result<(), Error> {
        let path = format!("/v1/devices/{device_id}");
        empty(self.request(Method::DELETE, &path, Some(token))).await
    }

    pub async fn set_push(
        &self,
        token: &str,
        device_id: u64,
        req: &PushSubscriptionRequest,
    ) -> Result<PushSubscriptionResponse, Error> {
        let path = format!("/v1/devices/{device_id}/push");
        json(send_json(
            self.request(Method::PUT, &path, Some(token)),
            req,
        ))
        .await
    }

    /// The device's subscription as the server keeps it; `None` if it has none.
    pub async fn push(
        &self,
        token: &str,
        device_id: u64,
    ) -> Result<Option<PushSubscriptionResponse>, Error> {
        let path = format!("/v1/devices/{device_id}/push");
        match json(self.request(Method::GET, &path, Some(token))).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the device's subscription; whether there was one.
    pub async fn remove_push(&self, token: &str, device_id: u64) -> Result<bool, Error> {
        let path = format!("/v1/devices/{device_id}/push");
        match empty(self.request(Method::DELETE, &path, Some(token))).await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn turn(&self, token: &str) -> Result<TurnCredentials, Error> {
        json(self.request(Method::GET, "/v1/calls/turn", Some(token))).await
    }

    pub async fn vapid(&self) -> Result<VapidResponse, Error> {
        json(self.request(Method::GET, "/v1/push/vapid", None)).await
    }

    /// `username` must already be validated (it goes into the path).
    pub async fn last_seen(&self, token: &str, username: &str) -> Result<LastSeenResponse, Error> {
        let path = format!("/v1/users/{username}/last-seen");
        json(self.request(Method::GET, &path, Some(token))).await
    }

    pub async fn privacy(&self, token: &str) -> Result<PrivacySettings, Error> {
        json(self.request(Method::GET, "/v1/settings/privacy", Some(token))).await
    }

    pub async fn set_privacy(
        &self,
        token: &str,
        settings: &PrivacySettings,
    ) -> Result<PrivacySettings, Error> {
        json(send_json(
            self.request(Method::PUT, "/v1/settings/privacy", Some(token)),
            settings,
        ))
        .await
    }
}

/// The group calls (PROTOCOL.md §2 and §7). Usernames must already be validated (they go
/// into paths).
impl Http {
    pub async fn create_group(
        &self,
        token: &str,
        req: &CreateGroupRequest,
    ) -> Result<GroupInfo, Error> {
        json(send_json(
            self.request(Method::POST, "/v1/groups", Some(token)),
            req,
        ))
        .await
    }

    pub async fn groups(&self, token: &str) -> Result<Vec<GroupSummary>, Error> {
        let r: GroupsResponse = json(self.request(Method::GET, "/v1/groups", Some(token))).await?;
        Ok(r.groups)
    }

    pub async fn group(&self, token: &str, id: u64) -> Result<GroupInfo, Error> {
        let path = format!("/v1/groups/{id}");
        json(self.request(Method::GET, &path, Some(token))).await
    }

    pub async fn update_group(
        &self,
        token: &str,
        id: u64,
        req: &UpdateGroupRequest,
    ) -> Result<GroupInfo, Error> {
        let path = format!("/v1/groups/{id}");
        json(send_json(
            self.request(Method::PATCH, &path, Some(token)),
            req,
        ))
        .await
    }

    pub async fn add_members(
        &self,
        token: &str,
        id: u64,
        members: Vec<String>,
    ) -> Result<GroupInfo, Error> {
        let path = format!("/v1/groups/{id}/members");
        json(send_json(
            self.request(Method::POST, &path, Some(token)),
            &AddMembersRequest { members },
        ))
        .await
    }

    pub async fn remove_member(
        &self,
        token: &str,
        id: u64,
        username: &str,
    ) -> Result<GroupInfo, Error> {
        let path = format!("/v1/groups/{id}/members/{username}");
        json(self.request(Method::DELETE, &path, Some(token))).await
    }

    pub async fn leave_group(&self, token: &str, id: u64) -> Result<(), Error> {
        let path = format!("/v1/groups/{id}/leave");
        empty(self.request(Method::POST, &path, Some(token))).await
    }

    /// Promotes (`admin == true`, PUT) or demotes (DELETE) a member.
    pub async fn set_admin(
        &self,
        token: &str,
        id: u64,
        username: &str,
        admin: bool,
    ) -> Result<GroupInfo, Error> {
        let path = format!("/v1/groups/{id}/admins/{username}");
        let method = if admin { Method::PUT } else { Method::DELETE };
        json(self.request(method, &path, Some(token))).await
    }

    pub async fn message_info(&self, token: &str, id: u64, seq: u64) -> Result<MessageInfo, Error> {
        let path = format!("/v1/groups/{id}/messages/{seq}");
        json(self.request(Method::GET, &path, Some(token))).await
    }
}

/// The key directory (PROTOCOL.md §9). Usernames must already be validated.
impl Http {
    pub async fn key_counts(&self, token: &str) -> Result<KeyCounts, Error> {
        json(self.request(Method::GET, "/v1/keys", Some(token))).await
    }

    pub async fn publish_keys(&self, token: &str, up: &KeysUpload) -> Result<KeyCounts, Error> {
        json(send_json(
            self.request(Method::PUT, "/v1/keys", Some(token)),
            up,
        ))
        .await
    }

    pub async fn user_keys(&self, token: &str, username: &str) -> Result<UserKeys, Error> {
        let path = format!("/v1/users/{username}/keys");
        json(self.request(Method::GET, &path, Some(token))).await
    }

    pub async fn group_keys(&self, token: &str, id: u64) -> Result<GroupKeys, Error> {
        let path = format!("/v1/groups/{id}/keys");
        json(self.request(Method::GET, &path, Some(token))).await
    }

    pub async fn claim_keys(&self, token: &str, devices: &[u64]) -> Result<ClaimResponse, Error> {
        let body = ClaimRequest {
            devices: devices.to_vec(),
        };
        json(send_json(
            self.request(Method::POST, "/v1/keys/claim", Some(token)),
            &body,
        ))
        .await
    }
}

fn send_json<T: Serialize>(rb: RequestBuilder, body: &T) -> RequestBuilder {
    rb.json(body)
}

async fn json<T: DeserializeOwned>(rb: RequestBuilder) -> Result<T, Error> {
    let resp = checked(rb.send().await?).await?;
    Ok(resp.json::<T>().await?)
}

async fn empty(rb: RequestBuilder) -> Result<(), Error> {
    checked(rb.send().await?).await?;
    Ok(())
}

/// Passes a success through; turns an error status into [`Error::Server`].
pub(crate) async fn checked(resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(MAX_ERROR_BODY)];
    Err(error_from(status, bytes))
}

fn error_from(status: StatusCode, body: &[u8]) -> Error {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return Error::Server {
            code: b.error.code,
            message: b.error.message,
            retry_after_secs: b.error.retry_after_secs,
        };
    }
    // Not the server's error shape (a proxy, an old server): keep the status' meaning.
    let code = match status.as_u16() {
        400 => ErrorCode::BadRequest,
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Conflict,
        411 => ErrorCode::LengthRequired,
        412 => ErrorCode::PreconditionFailed,
        413 => ErrorCode::TooLarge,
        429 => ErrorCode::RateLimited,
        460 => ErrorCode::ChecksumMismatch,
        502..=504 => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    Error::server(code, format!("HTTP {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_map_to_codes() {
        let body =
            br#"{"error":{"code":"rate_limited","message":"slow down","retry_after_secs":30}}"#;
        match error_from(StatusCode::TOO_MANY_REQUESTS, body) {
            Error::Server {
                code,
                message,
                retry_after_secs,
            } => {
                assert_eq!(code, ErrorCode::RateLimited);
                assert_eq!(message, "slow down");
                assert_eq!(retry_after_secs, Some(30));
            }
            other => panic!("unexpected {other:?}"),
        }
        let e = error_from(StatusCode::NOT_FOUND, b"<html>nope</html>");
        assert_eq!(e.code(), Some(ErrorCode::NotFound));
        let e = error_from(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.code(), Some(ErrorCode::Unavailable));
        // Media: the server's body names the code; without one, the status still does.
        let body = br#"{"error":{"code":"quota_exceeded","message":"10 GiB used"}}"#;
        let e = error_from(StatusCode::PAYLOAD_TOO_LARGE, body);
        assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded));
        let status = StatusCode::from_u16(460).expect("status");
        let e = error_from(status, b"");
        assert_eq!(e.code(), Some(ErrorCode::ChecksumMismatch));
        let e = error_from(StatusCode::PRECONDITION_FAILED, b"");
        assert_eq!(e.code(), Some(ErrorCode::PreconditionFailed));
    }
}
