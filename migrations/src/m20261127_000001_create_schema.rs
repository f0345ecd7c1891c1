//! The whole product's first schema (see `design.md`): tenants and access, the device registry,
//! packages, tasks and their per-device subtasks, download tokens, and the notification outbox.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, big_pk_auto, blob, blob_null, boolean, integer, integer_null,
    string, string_null, text, text_null,
};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

/// A text primary key (ids are generated or validated by `domain::id`).
fn id(name: &'static str) -> ColumnDef {
    string(name).primary_key().take()
}

/// A foreign key from `table.column` to `target.id`.
fn fk(
    table: &'static str,
    column: &'static str,
    target: &'static str,
    on_delete: ForeignKeyAction,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{table}_{column}"))
        .from(table, column)
        .to(target, "id")
        .on_delete(on_delete)
        .take()
}

fn index(
    table: &'static str,
    name: &str,
    columns: &[&'static str],
    unique: bool,
) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(format!(
        "{}_{table}_{name}",
        if unique { "uq" } else { "ix" }
    ))
    .table(table);
    for c in columns {
        i.col(*c);
    }
    if unique {
        i.unique();
    }
    i.take()
}

use ForeignKeyAction::{Cascade, Restrict, SetNull};

// `async_trait` requires the trait's exact signature, whose lifetime is elided.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // --- tenants and access -------------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("projects")
                .col(id("id"))
                .col(string("name"))
                .col(big_integer("created_at"))
                .take(),
        )
        .await?;
        m.create_index(index("projects", "name", &["name"], true))
            .await?;

        // IoTDA's resource spaces ("applications"); every project has one default space.
        m.create_table(
            Table::create()
                .table("applications")
                .col(id("id"))
                .col(string("project_id"))
                .col(string("name"))
                .col(boolean("is_default"))
                .col(big_integer("created_at"))
                .foreign_key(&mut fk("applications", "project_id", "projects", Cascade))
                .take(),
        )
        .await?;
        m.create_index(index(
            "applications",
            "project_name",
            &["project_id", "name"],
            true,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("users")
                .col(id("id"))
                .col(string("username"))
                .col(string("password_hash")) // argon2id PHC string
                .col(boolean("is_admin"))
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .col(big_integer_null("last_login_at"))
                .take(),
        )
        .await?;
        m.create_index(index("users", "username", &["username"], true))
            .await?;

        // Console sessions. The id is the SHA-256 of the cookie value, so a database leak yields no session.
        m.create_table(
            Table::create()
                .table("sessions")
                .col(id("id"))
                .col(string("user_id"))
                .col(string("project_id"))
                .col(big_integer("created_at"))
                .col(big_integer("expires_at"))
                .col(big_integer("last_seen_at"))
                .col(string_null("client_addr"))
                .col(string_null("user_agent"))
                .foreign_key(&mut fk("sessions", "user_id", "users", Cascade))
                .foreign_key(&mut fk("sessions", "project_id", "projects", Cascade))
                .take(),
        )
        .await?;
        m.create_index(index("sessions", "expires", &["expires_at"], false))
            .await?;

        // Application AK/SK. The SK is needed in clear to verify HMAC signatures, so it is encrypted with the
        // key kept outside the database (backend::secrets), never stored in plain text.
        m.create_table(
            Table::create()
                .table("api_credentials")
                .col(string("access_key").primary_key())
                .col(string("project_id"))
                .col(blob("secret_key_enc"))
                .col(string("description"))
                .col(big_integer("created_at"))
                .col(big_integer_null("last_used_at"))
                .col(big_integer_null("revoked_at"))
                .foreign_key(&mut fk(
                    "api_credentials",
                    "project_id",
                    "projects",
                    Cascade,
                ))
                .take(),
        )
        .await?;
        m.create_index(index("api_credentials", "project", &["project_id"], false))
            .await?;

        // --- device registry ----------------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("products")
                .col(id("id"))
                .col(string("project_id"))
                .col(string("app_id"))
                .col(string("name"))
                .col(string("device_type"))
                .col(string("protocol_type"))
                .col(string("data_format"))
                .col(string("manufacturer_name"))
                .col(string("industry"))
                .col(string("description"))
                .col(text("service_capabilities")) // JSON array, echoed as given
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .foreign_key(&mut fk("products", "project_id", "projects", Cascade))
                .foreign_key(&mut fk("products", "app_id", "applications", Restrict))
                .take(),
        )
        .await?;
        m.create_index(index("products", "project", &["project_id", "id"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("devices")
                .col(id("id"))
                .col(string("project_id"))
                .col(string("app_id"))
                .col(string("product_id"))
                .col(string("node_id"))
                .col(string("device_name"))
                .col(string("description"))
                .col(string_null("gateway_id"))
                .col(string("node_type"))
                .col(string("auth_type"))
                .col(blob_null("secret_enc"))
                .col(blob_null("secondary_secret_enc"))
                .col(string_null("fingerprint"))
                .col(boolean("secure_access"))
                .col(string("status"))
                .col(string_null("sw_version"))
                .col(string_null("fw_version"))
                .col(string_null("device_sdk_version"))
                .col(text_null("extension_info"))
                .col(text_null("last_radio")) // JSON {rsrp, sinr, cell_id, at} from the last LwM2M read
                .col(big_integer_null("connection_status_update_time"))
                .col(big_integer_null("active_time"))
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .foreign_key(&mut fk("devices", "project_id", "projects", Cascade))
                .foreign_key(&mut fk("devices", "product_id", "products", Restrict))
                .take(),
        )
        .await?;
        m.create_index(index(
            "devices",
            "product_node",
            &["product_id", "node_id"],
            true,
        ))
        .await?;
        m.create_index(index("devices", "node", &["node_id"], false))
            .await?;
        m.create_index(index("devices", "project", &["project_id", "id"], false))
            .await?;
        m.create_index(index("devices", "status", &["project_id", "status"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("device_groups")
                .col(id("id"))
                .col(string("project_id"))
                .col(string("app_id"))
                .col(string("name"))
                .col(string("description"))
                .col(string_null("super_group_id"))
                .col(string("group_type"))
                .col(text_null("dynamic_group_rule"))
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .foreign_key(&mut fk("device_groups", "project_id", "projects", Cascade))
                .foreign_key(&mut fk(
                    "device_groups",
                    "super_group_id",
                    "device_groups",
                    Restrict,
                ))
                .take(),
        )
        .await?;
        m.create_index(index(
            "device_groups",
            "name",
            &["project_id", "app_id", "name"],
            true,
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("device_group_members")
                .col(string("group_id"))
                .col(string("device_id"))
                .col(big_integer("added_at"))
                .primary_key(Index::create().col("group_id").col("device_id"))
                .foreign_key(&mut fk(
                    "device_group_members",
                    "group_id",
                    "device_groups",
                    Cascade,
                ))
                .foreign_key(&mut fk(
                    "device_group_members",
                    "device_id",
                    "devices",
                    Cascade,
                ))
                .take(),
        )
        .await?;
        m.create_index(index(
            "device_group_members",
            "device",
            &["device_id"],
            false,
        ))
        .await?;

        // --- packages -----------------------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("packages")
                .col(id("id"))
                .col(string("project_id"))
                .col(string("app_id"))
                .col(string("product_id"))
                .col(string("package_type"))
                .col(string_null("module_name"))
                .col(string("version"))
                .col(text("support_source_versions")) // JSON array of versions
                .col(string("description"))
                .col(text("custom_info"))
                .col(string("file_name"))
                .col(big_integer("size"))
                .col(string("sha256"))
                .col(string("source")) // "upload" or "bucket"
                .col(string("bucket"))
                .col(text("object_key"))
                .col(string_null("region"))
                .col(integer("segment_size"))
                .col(big_integer("created_at"))
                .foreign_key(&mut fk("packages", "project_id", "projects", Cascade))
                .foreign_key(&mut fk("packages", "product_id", "products", Restrict))
                .take(),
        )
        .await?;
        m.create_index(index(
            "packages",
            "version",
            &["product_id", "package_type", "version"],
            true,
        ))
        .await?;
        m.create_index(index(
            "packages",
            "project",
            &["project_id", "package_type", "id"],
            false,
        ))
        .await?;

        // --- tasks --------------------------------------------------------------------------------
        // Progress counters are kept on the task row, updated in the same transaction as each subtask
        // transition, so listing tasks never counts a million subtasks.
        let mut tasks = Table::create();
        tasks
            .table("tasks")
            .col(id("id"))
            .col(string("project_id"))
            .col(string("app_id"))
            .col(string("task_name"))
            .col(string("task_type"))
            .col(string_null("task_mode"))
            .col(boolean("need_confirm"))
            .col(text_null("task_ext_info"))
            .col(text_null("targets_filter"))
            .col(text("document"))
            .col(string_null("package_id"))
            .col(big_integer_null("schedule_time"))
            .col(integer("retry_count"))
            .col(integer("retry_interval_min"))
            .col(string("status"))
            .col(text("status_desc"));
        for counter in [
            "total",
            "processing",
            "success",
            "fail",
            "waitting",
            "fail_wait_retry",
            "stopped",
            "removed",
        ] {
            tasks.col(big_integer(counter).default(0));
        }
        tasks
            .col(big_integer("created_at"))
            .col(big_integer_null("started_at"))
            .col(big_integer_null("finished_at"))
            .col(big_integer("updated_at"))
            .foreign_key(&mut fk("tasks", "project_id", "projects", Cascade))
            .foreign_key(&mut fk("tasks", "package_id", "packages", SetNull));
        m.create_table(tasks.take()).await?;
        m.create_index(index(
            "tasks",
            "list",
            &["project_id", "task_type", "id"],
            false,
        ))
        .await?;
        m.create_index(index("tasks", "status", &["status"], false))
            .await?;

        // One device's run inside a task. `device_id` has no foreign key on purpose: the history of a
        // task outlives the devices it upgraded.
        m.create_table(
            Table::create()
                .table("subtasks")
                .col(big_pk_auto("id"))
                .col(string("task_id"))
                .col(string("device_id"))
                .col(string("status"))
                .col(string("step"))
                .col(integer("progress"))
                .col(integer("attempts"))
                .col(big_integer_null("deadline_at")) // the state machine's poll_timeout()
                .col(string_null("source_version"))
                .col(string_null("error_code"))
                .col(text_null("error_msg"))
                .col(text_null("output"))
                .col(text_null("machine")) // the serialised per-device state machine
                .col(string_null("lease_owner")) // the instance driving it (multi-instance)
                .col(big_integer_null("lease_until"))
                .col(big_integer("created_at"))
                .col(big_integer_null("started_at"))
                .col(big_integer("updated_at"))
                .col(big_integer_null("finished_at"))
                .foreign_key(&mut fk("subtasks", "task_id", "tasks", Cascade))
                .take(),
        )
        .await?;
        m.create_index(index(
            "subtasks",
            "task_device",
            &["task_id", "device_id"],
            true,
        ))
        .await?;
        m.create_index(index(
            "subtasks",
            "task_status",
            &["task_id", "status", "id"],
            false,
        ))
        .await?;
        m.create_index(index(
            "subtasks",
            "deadline",
            &["status", "deadline_at"],
            false,
        ))
        .await?;
        m.create_index(index("subtasks", "device", &["device_id", "status"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("subtask_steps")
                .col(big_pk_auto("id"))
                .col(big_integer("subtask_id"))
                .col(big_integer("at"))
                .col(string("step"))
                .col(string("status"))
                .col(integer("progress"))
                .col(text("detail"))
                .foreign_key(&mut fk("subtask_steps", "subtask_id", "subtasks", Cascade))
                .take(),
        )
        .await?;
        m.create_index(index(
            "subtask_steps",
            "subtask",
            &["subtask_id", "id"],
            false,
        ))
        .await?;

        // Bearer tokens for package downloads; only the SHA-256 of a token is stored.
        m.create_table(
            Table::create()
                .table("download_tokens")
                .col(string("token_hash").primary_key())
                .col(big_integer("subtask_id"))
                .col(string("device_id"))
                .col(string("package_id"))
                .col(big_integer("issued_at"))
                .col(big_integer("expires_at"))
                .col(big_integer_null("revoked_at"))
                .col(big_integer("bytes_served").default(0))
                .col(big_integer_null("last_used_at"))
                .foreign_key(&mut fk(
                    "download_tokens",
                    "subtask_id",
                    "subtasks",
                    Cascade,
                ))
                .take(),
        )
        .await?;
        m.create_index(index("download_tokens", "subtask", &["subtask_id"], false))
            .await?;

        // --- notifications ------------------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("notification_subscriptions")
                .col(id("id"))
                .col(string("project_id"))
                .col(string_null("app_id"))
                .col(text("url"))
                .col(blob("secret_enc"))
                .col(text("kinds")) // JSON array of outbox kinds this subscription receives
                .col(boolean("enabled"))
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .foreign_key(&mut fk(
                    "notification_subscriptions",
                    "project_id",
                    "projects",
                    Cascade,
                ))
                .take(),
        )
        .await?;

        // Every task and subtask change, written in the transaction that makes it; the console's live
        // updates and the webhook deliveries read from here.
        m.create_table(
            Table::create()
                .table("outbox")
                .col(big_pk_auto("id"))
                .col(string("project_id"))
                .col(string("kind"))
                .col(string("aggregate_id"))
                .col(text("payload"))
                .col(big_integer("created_at"))
                .foreign_key(&mut fk("outbox", "project_id", "projects", Cascade))
                .take(),
        )
        .await?;
        m.create_index(index("outbox", "project", &["project_id", "id"], false))
            .await?;

        m.create_table(
            Table::create()
                .table("notification_deliveries")
                .col(big_pk_auto("id"))
                .col(big_integer("outbox_id"))
                .col(string("subscription_id"))
                .col(string("status")) // pending | delivered | failed
                .col(integer("attempts"))
                .col(big_integer("next_attempt_at"))
                .col(integer_null("last_http_status"))
                .col(text_null("last_error"))
                .col(big_integer_null("delivered_at"))
                .col(big_integer("created_at"))
                .foreign_key(&mut fk(
                    "notification_deliveries",
                    "outbox_id",
                    "outbox",
                    Cascade,
                ))
                .foreign_key(&mut fk(
                    "notification_deliveries",
                    "subscription_id",
                    "notification_subscriptions",
                    Cascade,
                ))
                .take(),
        )
        .await?;
        m.create_index(index(
            "notification_deliveries",
            "due",
            &["status", "next_attempt_at"],
            false,
        ))
        .await?;
        m.create_index(index(
            "notification_deliveries",
            "once",
            &["outbox_id", "subscription_id"],
            true,
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "notification_deliveries",
            "outbox",
            "notification_subscriptions",
            "download_tokens",
            "subtask_steps",
            "subtasks",
            "tasks",
            "packages",
            "device_group_members",
            "device_groups",
            "devices",
            "products",
            "api_credentials",
            "sessions",
            "users",
            "applications",
            "projects",
        ] {
            m.drop_table(Table::drop().table(table).take()).await?;
        }
        Ok(())
    }
}
