//! Binds the gateway to the supervisor (placeholder until the session API lands).
