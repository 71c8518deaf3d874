//! Accounts, devices and sessions: sign-up, login, authentication (the one place that turns a
//! token into a device, for HTTP and the socket alike), removing devices, looking up users and
//! the caller's privacy setting.

use std::net::IpAddr;
use std::sync::Arc;

use tern_proto::http::{DeviceInfo, LoginResponse, RegisterResponse, Visibility};
use tern_proto::{ErrorCode, Limits, validate};
use tern_store::{DeviceAuth, Store, UserRecord};

use crate::auth::{self, HashError, PasswordHasher};
use crate::delivery::{CloseReason, Hub};
use crate::error::ApiError;
use crate::ratelimit::RateLimiter;
use crate::services::Clock;

pub struct Accounts {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    passwords: Arc<PasswordHasher>,
    rate_limits: Arc<dyn RateLimiter>,
    /// Verified against when a login names an unknown user (see `auth::decoy_hash`).
    decoy_hash: Arc<str>,
    limits: Limits,
}

/// Password hashing's refusals as API errors: a full pool is `unavailable` with a short
/// retry-after (the queue drains in well under a second per waiting place).
fn hashing_error(e: HashError) -> ApiError {
    match e {
        HashError::Busy => ApiError::busy("the server is busy; retry in a moment", 1),
        HashError::Failed(m) => {
            tracing::error!(error = %m, "password hashing failed");
            ApiError::new(ErrorCode::Internal, "internal error; retry later")
        }
    }
}

fn wrong_password() -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, "wrong username or password")
}

impl Accounts {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        clock: Arc<dyn Clock>,
        passwords: Arc<PasswordHasher>,
        rate_limits: Arc<dyn RateLimiter>,
        decoy_hash: Arc<str>,
        limits: Limits,
    ) -> Self {
        Accounts {
            store,
            hub,
            clock,
            passwords,
            rate_limits,
            decoy_hash,
            limits,
        }
    }

    /// A sign-up from `ip`.
    pub async fn register(
        &self,
        username: &str,
        password: String,
        ip: IpAddr,
    ) -> Result<RegisterResponse, ApiError> {
        let username = username.trim().to_ascii_lowercase();
        validate::username(&username).map_err(ApiError::bad_request)?;
        validate::password(&password, &username).map_err(ApiError::bad_request)?;
        if let Err(wait) = self.rate_limits.registration(ip).await {
            return Err(ApiError::rate_limited(
                "too many accounts created from this address; retry later",
                wait,
            ));
        }
        if self.store.user_by_name(&username).await?.is_some() {
            return Err(ApiError::new(ErrorCode::Conflict, "username is taken"));
        }
        let hash = self.passwords.hash(password).await.map_err(hashing_error)?;
        let user_id = self
            .store
            .create_user(&username, &hash, self.clock.now_ms())
            .await?;
        tracing::info!(user_id, "account created");
        Ok(RegisterResponse { user_id, username })
    }

    /// A login from `ip`: a new device with a new token.
    pub async fn login(
        &self,
        username: &str,
        password: String,
        device_name: &str,
        ip: IpAddr,
    ) -> Result<LoginResponse, ApiError> {
        let username = username.trim().to_ascii_lowercase();
        let device_name = match device_name.trim() {
            "" => "device",
            name => name,
        };
        validate::device_name(device_name).map_err(ApiError::bad_request)?;
        if password.len() > tern_proto::limits::PASSWORD_MAX
            || username.len() > tern_proto::limits::USERNAME_MAX
        {
            return Err(wrong_password());
        }
        if let Err(wait) = self.rate_limits.login(&username, ip).await {
            return Err(ApiError::rate_limited(
                "too many login attempts; retry later",
                wait,
            ));
        }
        let user = self.store.user_by_name(&username).await?;
        let hash = match &user {
            Some(u) => u.password_hash.clone(),
            None => self.decoy_hash.to_string(),
        };
        let ok = self
            .passwords
            .verify(password, hash)
            .await
            .map_err(hashing_error)?;
        let user = match (ok, user) {
            (true, Some(u)) => u,
            _ => {
                metrics::counter!("tern_login_failures_total").increment(1);
                return Err(wrong_password());
            }
        };
        self.rate_limits.login_succeeded(&username, ip).await;
        let token = auth::new_token();
        let device_id = self
            .store
            .create_device(
                user.id,
                device_name,
                &auth::token_hash(&token),
                self.limits.max_devices_per_user,
                self.clock.now_ms(),
            )
            .await?;
        tracing::info!(user_id = user.id, device_id, "device logged in");
        Ok(LoginResponse {
            user_id: user.id,
            username: user.username,
            device_id,
            token,
        })
    }

    /// The device an access token belongs to (the token of `Authorization: Bearer <token>`
    /// over HTTP, of `Hello` on the socket).
    pub async fn authenticate(&self, token: &str) -> Result<DeviceAuth, ApiError> {
        let token = token.trim();
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::unauthorized());
        }
        self.store
            .device_by_token(&auth::token_hash(token))
            .await?
            .ok_or_else(ApiError::unauthorized)
    }

    /// Removes one of the user's devices (its token stops working, its mailbox goes) and
    /// closes its connection, on whichever node.
    pub async fn remove_device(&self, user: u64, device: u64) -> Result<(), ApiError> {
        self.store.remove_device(user, device).await?;
        self.hub
            .disconnect(user, device, CloseReason::Revoked)
            .await;
        tracing::info!(user_id = user, device_id = device, "device removed");
        Ok(())
    }

    /// The caller's devices.
    pub async fn devices(&self, who: &DeviceAuth) -> Result<Vec<DeviceInfo>, ApiError> {
        Ok(self
            .store
            .list_devices(who.user_id)
            .await?
            .into_iter()
            .map(|d| DeviceInfo {
                device_id: d.id,
                current: d.id == who.device_id,
                name: d.name,
                created_at_ms: d.created_at_ms,
                last_seen_ms: d.last_seen_ms,
            })
            .collect())
    }

    /// A user by name (`not_found` for names that cannot exist, too).
    pub async fn user(&self, name: &str) -> Result<UserRecord, ApiError> {
        let name = name.trim().to_ascii_lowercase();
        let not_found = || ApiError::new(ErrorCode::NotFound, "user not found");
        if name.len() > tern_proto::limits::USERNAME_MAX {
            return Err(not_found());
        }
        self.store.user_by_name(&name).await?.ok_or_else(not_found)
    }

    /// The device ids of a user.
    pub async fn device_ids(&self, user: u64) -> Result<Vec<u64>, ApiError> {
        Ok(self
            .store
            .list_devices(user)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect())
    }

    pub async fn set_last_seen_privacy(&self, user: u64, v: Visibility) -> Result<(), ApiError> {
        Ok(self.store.set_last_seen_privacy(user, v).await?)
    }
}
