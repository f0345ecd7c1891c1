//! One component per console page. Every page renders on the server (it works without JavaScript:
//! links and GET forms navigate, POST forms submit) and becomes interactive once hydrated.

pub mod devices;
pub mod groups;
pub mod layout;
pub mod login;
pub mod products;
pub mod settings;
pub mod upgrades;

pub use devices::DevicesPage;
pub use groups::GroupsPage;
pub use layout::{Layout, NotFound};
pub use login::LoginPage;
pub use products::ProductsPage;
pub use settings::SettingsPage;
pub use upgrades::UpgradesPage;
