//! Host implementation of `fermyon:spin/variables@2.0.0`: the component's
//! variables from `spin.toml`, resolved once at load time.

use super::bindings::variables as wit;
use super::state::State;

/// Spin variable names are lowercase ASCII letters, digits and underscores,
/// starting with a letter.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl wit::Host for State {
    async fn get(&mut self, name: String) -> wasmtime::Result<Result<String, wit::Error>> {
        if !is_valid_name(&name) {
            return Ok(Err(wit::Error::InvalidName(name)));
        }
        Ok(match self.component.variables.get(&name) {
            Some(value) => Ok(value.clone()),
            None => Err(wit::Error::Undefined(format!(
                "variable {name} is not declared for component {}",
                self.component.id
            ))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid_name;

    #[test]
    fn variable_names() {
        assert!(is_valid_name("jwt_secret"));
        assert!(is_valid_name("a1"));
        assert!(!is_valid_name("JWT"));
        assert!(!is_valid_name("1a"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a-b"));
    }
}
