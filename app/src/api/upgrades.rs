//! Software/Firmware Upgrades: packages and tasks (read-only listings).

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use crate::error::ApiError;

/// A package row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRow {
    /// Package id.
    pub package_id: String,
    /// `softwarePackage` or `firmwarePackage`.
    pub package_type: String,
    /// Product id.
    pub product_id: String,
    /// Version.
    pub version: String,
    /// File name.
    pub file_name: String,
    /// Size in bytes.
    pub size: i64,
    /// Upload time.
    pub created: String,
}

/// A task row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id.
    pub task_id: String,
    /// Name.
    pub task_name: String,
    /// `softwareUpgrade` or `firmwareUpgrade`.
    pub task_type: String,
    /// IoTDA status (`Processing`, `Success`...).
    pub status: String,
    /// Subtasks in all.
    pub total: i64,
    /// Subtasks succeeded.
    pub success: i64,
    /// Subtasks failed.
    pub fail: i64,
    /// Creation time.
    pub created: String,
}

/// Lists packages, newest first.
#[server(prefix = "/api", endpoint = "list_packages")]
pub async fn list_packages(offset: u64) -> Result<PageOf<PackageRow>, ApiError> {
    use backend::service::{Page, packages};
    let (state, user) = super::ssr::context().await?;
    let filter = packages::Filter::default();
    let page = packages::list(&state, &user.project_id, filter, Page::new(50, offset)).await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|row| row.package)
            .map(|p| PackageRow {
                package_id: p.id,
                package_type: p.package_type,
                product_id: p.product_id,
                version: p.version,
                file_name: p.file_name,
                size: p.size,
                created: super::ssr::when(p.created_at),
            })
            .collect(),
        total: page.total,
        offset,
        limit: 50,
    })
}

/// Lists tasks, newest first.
#[server(prefix = "/api", endpoint = "list_tasks")]
pub async fn list_tasks(offset: u64) -> Result<PageOf<TaskRow>, ApiError> {
    use backend::service::{Page, overview};
    let (state, user) = super::ssr::context().await?;
    let page = overview::tasks(&state, &user.project_id, Page::new(50, offset)).await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|t| TaskRow {
                task_id: t.id,
                task_name: t.task_name,
                task_type: t.task_type,
                status: t.status,
                total: t.total,
                success: t.success,
                fail: t.fail,
                created: super::ssr::when(t.created_at),
            })
            .collect(),
        total: page.total,
        offset,
        limit: 50,
    })
}
