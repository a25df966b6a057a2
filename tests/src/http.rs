//! HTTP requests to a host's routes, bounded in time and never through a
//! proxy.

use std::time::Duration;

use serde_json::Value;

/// Bound on one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A response's status and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    /// Parses the body as JSON, panicking with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| {
            panic!(
                "response body (status {}) is not JSON: {error}; body: {}",
                self.status, self.body
            )
        })
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("failed to build an HTTP client")
}

/// Sends `GET url`, with `Authorization: Bearer TOKEN` when a token is given.
pub async fn get(url: &str, bearer: Option<&str>) -> HttpResponse {
    match bearer {
        Some(token) => {
            get_with_headers(url, &[("Authorization", &format!("Bearer {token}"))]).await
        }
        None => get_with_headers(url, &[]).await,
    }
}

/// Sends `GET url` with the given headers; panics when no response arrives.
pub async fn get_with_headers(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut request = client().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {url} failed: {error}"));
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .unwrap_or_else(|error| panic!("failed to read the body of GET {url}: {error}"));
    HttpResponse { status, body }
}

/// Returns the status of `GET url`, or `None` when the request fails (for
/// example while the server is not listening yet).
pub async fn status_of(url: &str) -> Option<u16> {
    let response = client()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}
