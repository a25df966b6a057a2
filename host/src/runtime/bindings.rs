//! Bindings generated from `wit/` for the `nexus:chat/host` world: the
//! `nexus:chat` handler export and the Spin interfaces the host implements.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "nexus:chat/chat-host",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "fermyon:spin/redis.connection": super::redis::RedisConnection,
        "spin:postgres/postgres.connection": super::postgres::PgConnection,
    },
});

pub use fermyon::spin::{redis, variables};
pub use nexus::chat::types::{
    Connection as ConnectionInfo, Effect, Event, EventSource, HandlerError,
};
pub use spin::postgres::postgres;

impl nexus::chat::types::Host for super::state::State {}
