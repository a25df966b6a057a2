//! Work that belongs to no live connection: announcing the users of a dead
//! instance as offline, and reloading components on SIGHUP.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::net::session::frame;
use crate::runtime::bindings::{ConnectionInfo, Effect, Event, EventSource};
use crate::runtime::ReloadOutcome;

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
    let manifest = app.manifest();
    let Some(targets) = manifest.events.get(event_name) else {
        return;
    };
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
                    app.backplane
                        .broadcast(frame(&outbound.event, &outbound.data))
                        .await
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

/// Reloads `spin.toml` and its components on every SIGHUP. Components that
/// fail to load keep their previous version, and the new manifest's event
/// routes apply only when every component it names is loaded.
pub fn spawn_reloader(app: Arc<App>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                warn!(cause = %error, "failed to install the SIGHUP handler; reloads are off");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            reload(&app).await;
        }
    });
}

pub async fn reload(app: &App) {
    info!("reloading the manifest and components");
    let manifest = match Manifest::load(&app.config.manifest) {
        Ok(manifest) => manifest,
        Err(error) => {
            warn!(cause = %format!("{error:#}"), "reload rejected: the manifest is invalid; the current one stays");
            count_reload(app, "rejected");
            return;
        }
    };
    let outcomes = match app.runtime.reload(&manifest, &app.config).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            warn!(cause = %format!("{error:#}"), "reload rejected");
            count_reload(app, "rejected");
            return;
        }
    };
    for (component, outcome) in &outcomes {
        match outcome {
            ReloadOutcome::Unchanged => info!(component, "component unchanged"),
            ReloadOutcome::Applied { digest } => {
                info!(component, digest = %&digest[..12], "component reloaded");
                count_reload(app, "applied");
            }
            ReloadOutcome::Rejected { reason } => {
                warn!(component, %reason, "component rejected; the previous version keeps serving");
                count_reload(app, "rejected");
            }
        }
    }
    let routed: Vec<&String> = manifest.events.values().flatten().collect();
    if routed.iter().all(|id| app.runtime.has_component(id)) {
        app.set_manifest(manifest);
    } else {
        warn!("new event routes name components that are not loaded; the current routes stay");
    }
}

fn count_reload(app: &App, outcome: &'static str) {
    app.metrics
        .reloads
        .get_or_create(&Metrics::label("outcome", outcome))
        .inc();
}
