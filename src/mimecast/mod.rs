//! Everything that speaks to Mimecast API 2.0: the feed table, the wire format, OAuth, the cursor windows and
//! the blocking client that runs one page fetch.

pub mod auth;
pub mod client;
pub mod feed;
pub mod window;
pub mod wire;

pub use feed::Feed;
