//! One component per console page. Every page renders on the server (it works without JavaScript:
//! links and GET forms navigate, POST forms submit) and becomes interactive once hydrated.

pub mod audit;
pub mod devices;
pub mod groups;
pub mod layout;
pub mod login;
pub mod packages;
pub mod products;
pub mod reference;
pub mod rollout;
pub mod settings;
pub mod tasks;

pub use audit::AuditPage;
pub use devices::{DevicePage, DevicesPage};
pub use groups::{GroupPage, GroupsPage};
pub use layout::{Layout, NotFound};
pub use login::LoginPage;
pub use packages::{PackagePage, PackagesPage};
pub use products::ProductsPage;
pub use reference::ReferencePage;
pub use settings::SettingsPage;
pub use tasks::{NewTaskPage, TaskPage, TasksPage};
