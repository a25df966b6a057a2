//! Host events that belong to no live connection: announcing the users of a
//! dead instance as offline.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::app::App;
use crate::net::session::frame;
use crate::runtime::bindings::{ConnectionInfo, Effect, Event, EventSource};

/// Runs `$disconnected` for each user that a reaped instance left behind.
pub fn spawn_offline_announcer(app: Arc<App>, mut users: mpsc::UnboundedReceiver<String>) {
    tokio::spawn(async move {
        while let Some(user_id) = users.recv().await {
            let data = json!({ "userId": user_id, "reason": "instance-lost" }).to_string();
            run_detached(&app, &user_id, "$disconnected", data).await;
        }
    });
}

/// Runs a host event for `user_id` outside any connection. Only effects
/// that reach other users (deliveries and broadcasts) apply here.
pub async fn run_detached(app: &App, user_id: &str, event_name: &str, data: String) {
    let Some(targets) = app.manifest.events.get(event_name) else { return };
    let connection = ConnectionInfo {
        id: format!("detached-{}", app.instance_id),
        instance_id: app.instance_id.clone(),
        user_id: Some(user_id.to_string()),
        expires_at_ms: 0,
        remote_addr: String::new(),
        now_ms: chrono::Utc::now().timestamp_millis().max(0) as u64,
    };
    let event = Event {
        name: event_name.to_string(),
        data,
        source: EventSource::Host,
    };
    for component in targets {
        let effects = match app.runtime.invoke(component, &connection, &event).await {
            Ok(effects) => effects,
            Err(error) => {
                warn!(event = event_name, component, user_id, cause = %error, "detached event failed");
                continue;
            }
        };
        for effect in effects {
            let result = match effect {
                Effect::Deliver(delivery) => {
                    let text = frame(&delivery.event, &delivery.data);
                    app.backplane.deliver(&delivery.user_id, text).await
                }
                Effect::Broadcast(outbound) => {
                    app.backplane.broadcast(frame(&outbound.event, &outbound.data)).await
                }
                other => {
                    debug!(event = event_name, effect = ?other, "effect has no connection to act on");
                    Ok(())
                }
            };
            if let Err(error) = result {
                warn!(event = event_name, user_id, cause = %format!("{error:#}"), "detached delivery failed");
            }
        }
    }
}
