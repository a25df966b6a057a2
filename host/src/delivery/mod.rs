//! Delivery: this instance's connection registry and the Redis backplane
//! that reaches users on other instances.

pub mod backplane;
pub mod queue;
pub mod registry;
