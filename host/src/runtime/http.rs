//! Serves a component's `wasi:http/incoming-handler` for its HTTP routes.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{RequestOptions, WasiHttpHooks, WasiHttpView};

use super::Runtime;

/// Hooks that reject every outgoing HTTP request: no component lists an
/// HTTP host in `allowed_outbound_hosts`.
struct DenyOutgoing;

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
)>;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

pub(super) fn deny_outgoing_hooks() -> &'static mut dyn WasiHttpHooks {
    // `DenyOutgoing` has no fields, so leaking a box of it allocates nothing.
    Box::leak(Box::new(DenyOutgoing))
}

/// Largest request body passed to a component, in bytes.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

impl Runtime {
    /// Runs one HTTP request through a fresh instance of `component`.
    pub async fn serve_http(
        &self,
        component: &str,
        request: http::Request<Bytes>,
    ) -> anyhow::Result<http::Response<HyperOutgoingBody>> {
        let loaded = self.component(component)?;
        let permit = Arc::clone(&self.permits).acquire_owned().await?;
        let mut store = self.new_store(&loaded);
        let (parts, body) = request.into_parts();
        let body = Full::new(body).map_err(
            |never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} },
        );
        let request = http::Request::from_parts(parts, body);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let outparam = store.data_mut().http().new_response_outparam(sender)?;
        let proxy = loaded.proxy.clone();

        // The body may still stream after the head is sent, so the instance
        // runs in its own task until the handler returns.
        let task = tokio::spawn(async move {
            let outcome = async {
                let proxy = proxy.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
            }
            .await;
            // The store gives its pool slot back on drop, so the permit goes
            // after it.
            drop(store);
            drop(permit);
            outcome
        });

        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => anyhow::bail!("component {component} returned an error: {code:?}"),
            Err(_) => {
                let outcome = task.await?;
                match outcome {
                    Ok(()) => anyhow::bail!("component {component} sent no response"),
                    Err(error) => Err(anyhow::anyhow!("{error:?}").context(format!(
                        "component {component} failed to handle the request"
                    ))),
                }
            }
        }
    }
}
