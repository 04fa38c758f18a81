//! No code: this package holds the tests that cross services (`tests/it/`), so that no service
//! needs another as a dependency. See `tests/it/main.rs`.
