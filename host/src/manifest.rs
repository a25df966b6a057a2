//! Reads `spin.toml`: the components, their variables and outbound hosts, the
//! HTTP routes, and the WebSocket event routes under
//! `[application.tool.nexus-host]`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct RawManifest {
    spin_manifest_version: u32,
    application: RawApplication,
    #[serde(default)]
    variables: BTreeMap<String, RawVariable>,
    #[serde(default)]
    trigger: RawTriggers,
    #[serde(default)]
    component: BTreeMap<String, RawComponent>,
}

#[derive(Debug, Deserialize)]
struct RawApplication {
    name: String,
    #[serde(default)]
    tool: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
struct RawVariable {
    default: Option<String>,
    #[serde(default)]
    required: bool,
}

#[derive(Debug, Default, Deserialize)]
struct RawTriggers {
    #[serde(default)]
    http: Vec<RawHttpTrigger>,
}

#[derive(Debug, Deserialize)]
struct RawHttpTrigger {
    route: String,
    component: String,
}

#[derive(Debug, Deserialize)]
struct RawComponent {
    source: String,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostTool {
    interface: String,
    events: BTreeMap<String, RawEventTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawEventTarget {
    One(String),
    Many(Vec<String>),
}

/// An application variable declared under `[variables]`.
#[derive(Debug, Clone)]
pub struct AppVariable {
    pub default: Option<String>,
    pub required: bool,
}

/// A component with its variables and outbound hosts still as templates.
#[derive(Debug, Clone)]
pub struct ComponentSpec {
    pub id: String,
    /// Absolute path of the `.wasm` file.
    pub source: PathBuf,
    pub variables: BTreeMap<String, String>,
    pub allowed_outbound_hosts: Vec<String>,
}

/// An HTTP route prefix served by a component. `/auth/...` becomes the
/// prefix `/auth`; a route without `/...` matches exactly.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub path: String,
    pub wildcard: bool,
    pub component: String,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub app_name: String,
    pub variables: BTreeMap<String, AppVariable>,
    pub components: Vec<ComponentSpec>,
    pub http_routes: Vec<HttpRoute>,
    /// Event name to the components that handle it, in order.
    pub events: HashMap<String, Vec<String>>,
    /// The `nexus:chat` interface the components must export.
    pub interface: String,
}

impl Manifest {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read manifest {}", path.display()))?;
        let dir = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, dir).with_context(|| format!("invalid manifest {}", path.display()))
    }

    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let raw: RawManifest = toml::from_str(text)?;
        if raw.spin_manifest_version != 2 {
            bail!(
                "spin_manifest_version is {}, expected 2",
                raw.spin_manifest_version
            );
        }

        let tool = raw
            .application
            .tool
            .get("nexus-host")
            .context("missing [application.tool.nexus-host] with the event routes")?;
        let tool: RawHostTool = tool
            .clone()
            .try_into()
            .context("invalid [application.tool.nexus-host]")?;

        let dir = std::path::absolute(dir)?;
        let components: Vec<ComponentSpec> = raw
            .component
            .into_iter()
            .map(|(id, component)| ComponentSpec {
                source: dir.join(&component.source),
                id,
                variables: component.variables,
                allowed_outbound_hosts: component.allowed_outbound_hosts,
            })
            .collect();
        let known = |id: &str| components.iter().any(|component| component.id == id);

        let mut events = HashMap::new();
        for (event, target) in tool.events {
            let targets = match target {
                RawEventTarget::One(id) => vec![id],
                RawEventTarget::Many(ids) => ids,
            };
            for id in &targets {
                if !known(id) {
                    bail!("event {event} is routed to unknown component {id}");
                }
            }
            events.insert(event, targets);
        }

        let mut http_routes = Vec::new();
        for trigger in raw.trigger.http {
            if !known(&trigger.component) {
                bail!(
                    "route {} names unknown component {}",
                    trigger.route,
                    trigger.component
                );
            }
            let (path, wildcard) = match trigger.route.strip_suffix("/...") {
                Some(prefix) => (prefix.to_string(), true),
                None => (trigger.route.clone(), false),
            };
            http_routes.push(HttpRoute {
                path,
                wildcard,
                component: trigger.component,
            });
        }

        let variables = raw
            .variables
            .into_iter()
            .map(|(name, variable)| {
                let variable = AppVariable {
                    default: variable.default,
                    required: variable.required,
                };
                (name, variable)
            })
            .collect();

        Ok(Self {
            app_name: raw.application.name,
            variables,
            components,
            http_routes,
            events,
            interface: tool.interface,
        })
    }

    /// Finds the component that serves an HTTP path.
    pub fn route_for(&self, path: &str) -> Option<&HttpRoute> {
        self.http_routes.iter().find(|route| {
            if route.wildcard {
                path == route.path
                    || path
                        .strip_prefix(route.path.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            } else {
                path == route.path
            }
        })
    }
}

/// Expands `{{ name }}` references to application variables.
pub fn expand_template(
    template: &str,
    values: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let mut output = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        output.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .with_context(|| format!("unclosed '{{{{' in template {template:?}"))?;
        let name = after[..end].trim();
        let value = values
            .get(name)
            .with_context(|| format!("template {template:?} names unknown variable {name}"))?;
        output.push_str(value);
        rest = &after[end + 2..];
    }
    output.push_str(rest);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_expands_variables() {
        let values = BTreeMap::from([
            ("host".to_string(), "127.0.0.1".to_string()),
            ("port".to_string(), "6379".to_string()),
        ]);
        let expanded = expand_template("redis://{{ host }}:{{port}}", &values).unwrap();
        assert_eq!(expanded, "redis://127.0.0.1:6379");
    }

    #[test]
    fn template_rejects_unknown_variable() {
        let error = expand_template("{{ missing }}", &BTreeMap::new()).unwrap_err();
        assert!(error.to_string().contains("missing"));
    }

    #[test]
    fn repository_manifest_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let manifest = Manifest::load(&dir.join("spin.toml")).unwrap();
        assert_eq!(manifest.events["NEW_MESSAGE"], vec!["message".to_string()]);
        assert_eq!(
            manifest.route_for("/messages/bob").unwrap().component,
            "message"
        );
        assert!(manifest.route_for("/messagesx").is_none());
        assert!(manifest.variables["jwt_secret"].required);
    }
}
