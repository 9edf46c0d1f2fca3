//! Serving (issue 3, in progress): what the transports share. So far the pure layers: line
//! framing ([`framing`]), the request parser ([`protocol`]) and the event encoder
//! ([`events`]). The queue, the engine thread and the UNIX-socket and serial transports come
//! with the daemon; this module will know the engine only through its request and event types.

pub mod events;
pub mod framing;
pub mod protocol;
