//! Redis Sentinel (step 5).
