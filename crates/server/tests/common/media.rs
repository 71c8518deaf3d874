//! Media over HTTP for tests: an account's requests to one node (whole objects and tus).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use super::TestServer;

pub fn id_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic, incompressible-looking bytes.
pub fn blob(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn new(server: &TestServer, name: &str) -> Api {
        let (_, _, token) = server.http().account(name).await;
        Api {
            base: server.url(),
            token,
            http: reqwest::Client::new(),
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub fn tus(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.req(method, path).header("Tus-Resumable", "1.0.0")
    }

    pub async fn put(&self, id: &str, bytes: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let r = self
            .req(reqwest::Method::PUT, &format!("/v1/media/{id}"))
            .body(bytes)
            .send()
            .await
            .expect("put");
        let status = r.status();
        (status, r.json().await.unwrap_or_default())
    }

    pub async fn get(&self, id: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/media/{id}"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("get")
    }

    pub async fn head(&self, id: &str) -> StatusCode {
        self.req(reqwest::Method::HEAD, &format!("/v1/media/{id}"))
            .send()
            .await
            .expect("head")
            .status()
    }

    /// Creates a tus upload; returns its path.
    pub async fn create(&self, length: usize, sha256: Option<&str>) -> String {
        let mut r = self
            .tus(reqwest::Method::POST, "/v1/uploads")
            .header("Upload-Length", length.to_string());
        if let Some(h) = sha256 {
            r = r.header(
                "Upload-Metadata",
                format!("filename {},sha256 {}", B64.encode("x.bin"), B64.encode(h)),
            );
        }
        let resp = r.send().await.expect("create");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert!(resp.headers().contains_key("upload-expires"));
        resp.headers()["location"]
            .to_str()
            .expect("location")
            .to_owned()
    }

    pub async fn patch(&self, path: &str, offset: usize, chunk: Vec<u8>) -> reqwest::Response {
        self.tus(reqwest::Method::PATCH, path)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .body(chunk)
            .send()
            .await
            .expect("patch")
    }

    pub async fn offset(&self, path: &str) -> (StatusCode, u64) {
        let r = self
            .tus(reqwest::Method::HEAD, path)
            .send()
            .await
            .expect("head");
        let offset = r
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        (r.status(), offset)
    }
}

impl Api {
    /// The same account's requests to another node (or the load balancer) at `base`.
    pub fn at(&self, base: String) -> Api {
        Api {
            base,
            token: self.token.clone(),
            http: self.http.clone(),
        }
    }
}
