//! Component settings, read from the Spin variables that `spin.toml`
//! declares for each component. A missing or unparsable setting is an
//! `INTERNAL_ERROR`, because it is a deployment fault and not the client's.

use crate::{Error, Result};

/// Reads the Spin variable `name`.
pub fn get(name: &str) -> Result<String> {
    spin_sdk::variables::get(name).map_err(|error| {
        eprintln!("reading setting {name} failed: {error:?}");
        Error::internal(format!("setting {name} could not be read"))
    })
}

/// Reads the Spin variable `name` as an unsigned integer of at least `min`.
pub fn get_u64(name: &str, min: u64) -> Result<u64> {
    parse_u64(name, &get(name)?, min)
}

/// Reads the Spin variable `name` as an `on`/`off` switch.
pub fn get_switch(name: &str) -> Result<bool> {
    parse_switch(name, &get(name)?)
}

/// Parses the value `raw` of setting `name` as an unsigned integer of at
/// least `min`.
pub fn parse_u64(name: &str, raw: &str, min: u64) -> Result<u64> {
    let value: u64 = raw.trim().parse().map_err(|_| {
        Error::internal(format!(
            "setting {name} must be a whole number of at least {min}, got {raw:?}"
        ))
    })?;
    if value < min {
        return Err(Error::internal(format!(
            "setting {name} must be at least {min}, got {value}"
        )));
    }
    Ok(value)
}

/// Parses the value `raw` of setting `name` as `on` or `off`.
pub fn parse_switch(name: &str, raw: &str) -> Result<bool> {
    match raw.trim() {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(Error::internal(format!(
            "setting {name} must be on or off, got {raw:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn parse_u64_accepts_numbers() {
        assert_eq!(parse_u64("limit", "100", 0), Ok(100));
        assert_eq!(parse_u64("limit", " 7 ", 1), Ok(7));
    }

    #[test]
    fn parse_u64_rejects_bad_values() {
        let error = parse_u64("message_rate_limit", "ten", 0);
        assert_eq!(
            error.as_ref().map_err(|e| e.code),
            Err(ErrorCode::InternalError)
        );
        assert!(error.is_err_and(|e| e.message.contains("message_rate_limit")));
        assert!(parse_u64("window", "-1", 0).is_err());
        assert!(parse_u64("window", "0", 1).is_err_and(|e| e.message.contains("at least 1")));
    }

    #[test]
    fn parse_switch_values() {
        assert_eq!(parse_switch("fault_injection", "on"), Ok(true));
        assert_eq!(parse_switch("fault_injection", "off"), Ok(false));
        assert!(parse_switch("fault_injection", "yes").is_err());
    }
}
