//! Console users and sessions.
//!
//! - Passwords are hashed with argon2id (OWASP parameters, the `argon2` crate's defaults), on the small
//!   pool of [`crate::hashing`], so hashing never stalls the async runtime nor the blocking pool that
//!   file reads use, and a flood of sign-ins costs at most the pool's threads.
//! - A session is a random 256-bit token in a cookie; the database keeps only its SHA-256.
//! - Failed logins are throttled per user name and client address, and per client address alone, on the
//!   injected clock. An attempt counts from the moment it starts (check and record are one step), so
//!   simultaneous attempts cannot all pass the same check.
//! - An unknown user name costs the same hash as a wrong password, so timing does not reveal which names exist.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use domain::Timestamp;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, Set};
use secrecy::{ExposeSecret, SecretString};

use crate::storage::entity::{sessions, users};
use crate::{AppState, Error, Result, ids};

/// The first admin's user name unless configured otherwise.
pub const DEFAULT_ADMIN: &str = "admin";

/// A logged-in console user, as the session cookie resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentUser {
    /// The user's id.
    pub user_id: String,
    /// The user name.
    pub username: String,
    /// Whether the user may manage users and credentials.
    pub is_admin: bool,
    /// The project the session works in.
    pub project_id: String,
    /// When the session ends unless used again.
    pub expires_at: Timestamp,
    /// The session's stored id (the SHA-256 of its token, never the token itself).
    pub session_id: String,
}

/// A new session: the token goes into the cookie and nowhere else.
#[derive(Debug)]
pub struct NewSession {
    /// The cookie value.
    pub token: SecretString,
    /// When it expires unless used.
    pub expires_at: Timestamp,
    /// Who logged in.
    pub user: CurrentUser,
}

/// What the first start did about the admin account.
#[derive(Debug)]
pub enum AdminBootstrap {
    /// Users already existed; nothing was done.
    Existing,
    /// The admin was created with the password from the configuration or environment.
    CreatedWithGivenPassword {
        /// The admin's user name.
        username: String,
    },
    /// The admin was created with this random password, to be shown once.
    CreatedWithGeneratedPassword {
        /// The admin's user name.
        username: String,
        /// The password.
        password: SecretString,
    },
}

/// A hash to verify against when the user does not exist, so both paths cost the same.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_blocking("not a real password").expect("argon2 hashing works"));

fn hash_blocking(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("argon2: {e}")))
}

fn verify_blocking(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Hashes `password` with argon2id on the hashing pool.
///
/// # Errors
/// [`Error::Busy`] when the pool is full; [`Error::Internal`] if hashing fails.
pub async fn hash_password(state: &AppState, password: SecretString) -> Result<String> {
    state
        .hasher
        .run(move || hash_blocking(password.expose_secret()))
        .await?
}

/// Checks a new password against the policy: 10 to 128 characters.
///
/// # Errors
/// [`Error::Validation`] for `password`.
pub fn check_password_policy(password: &str) -> Result<()> {
    let n = password.chars().count();
    if !(10..=128).contains(&n) {
        return Err(
            domain::ValidationError::new("password", "must be 10 to 128 characters").into(),
        );
    }
    Ok(())
}

/// Creates the first admin if there are no users yet.
///
/// # Errors
/// [`Error::Validation`] when a given password breaks the policy; [`Error::Db`].
pub async fn bootstrap_admin(
    state: &AppState,
    username: &str,
    password: Option<SecretString>,
) -> Result<AdminBootstrap> {
    if users::Entity::find().one(&state.db).await?.is_some() {
        return Ok(AdminBootstrap::Existing);
    }
    let (password, generated) = match password {
        Some(p) => {
            check_password_policy(p.expose_secret())?;
            (p, false)
        }
        None => (SecretString::from(ids::alphanumeric(20)), true),
    };
    create_user(state, username, password.clone(), true).await?;
    Ok(if generated {
        AdminBootstrap::CreatedWithGeneratedPassword {
            username: username.to_owned(),
            password,
        }
    } else {
        AdminBootstrap::CreatedWithGivenPassword {
            username: username.to_owned(),
        }
    })
}

/// Creates a console user.
///
/// # Errors
/// [`Error::Validation`] for a bad name or password; [`Error::Conflict`] when the name is taken; [`Error::Db`].
pub async fn create_user(
    state: &AppState,
    username: &str,
    password: SecretString,
    is_admin: bool,
) -> Result<users::Model> {
    let username = domain::text::bounded("username", username, 64, true)?;
    if !username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
    {
        return Err(domain::ValidationError::new(
            "username",
            "may contain only letters, digits, '_', '-', '.' and '@'",
        )
        .into());
    }
    check_password_policy(password.expose_secret())?;
    let hash = hash_password(state, password).await?;
    let now = state.clock.now();
    users::ActiveModel {
        id: Set(ids::object_id(now)),
        username: Set(username.clone()),
        password_hash: Set(hash),
        is_admin: Set(is_admin),
        created_at: Set(now.as_millis()),
        updated_at: Set(now.as_millis()),
        last_login_at: Set(None),
    }
    .insert(&state.db)
    .await
    .map_err(|e| {
        crate::storage::conflict_on_unique(e, || format!("user {username} already exists"))
    })
}

/// Changes `user_id`'s password after checking the current one, and ends the user's other sessions.
///
/// # Errors
/// [`Error::Validation`] for `current_password` when it is wrong, or for `password` when the new one breaks
/// the policy; [`Error::NotFound`]; [`Error::Db`].
pub async fn change_password(
    state: &AppState,
    user_id: &str,
    keep_session_id: Option<&str>,
    current: SecretString,
    new: SecretString,
) -> Result<()> {
    let user = users::Entity::find_by_id(user_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("user", user_id))?;
    check_password_policy(new.expose_secret())?;
    let phc = user.password_hash.clone();
    let ok = state
        .hasher
        .run(move || verify_blocking(current.expose_secret(), &phc))
        .await?;
    if !ok {
        return Err(domain::ValidationError::new(
            "current_password",
            "is not your current password",
        )
        .into());
    }
    let hash = hash_password(state, new).await?;
    let now = state.clock.now().as_millis();
    let mut active = user.into_active_model();
    active.password_hash = Set(hash);
    active.updated_at = Set(now);
    active.update(&state.db).await?;
    let keep = keep_session_id.unwrap_or_default();
    sessions::Entity::delete_many()
        .filter(sessions::Column::UserId.eq(user_id))
        .filter(sessions::Column::Id.ne(keep))
        .exec(&state.db)
        .await?;
    tracing::info!(user_id, "password changed; other sessions ended");
    Ok(())
}

/// Logs a user in and opens a session in `project_id`.
///
/// # Errors
/// [`Error::RateLimited`] after too many failures; [`Error::Unauthorized`] for a wrong name or password
/// (the same message for both); [`Error::Db`].
pub async fn login(
    state: &AppState,
    username: &str,
    password: SecretString,
    project_id: &str,
    client_addr: Option<&str>,
    user_agent: Option<&str>,
) -> Result<NewSession> {
    let now = state.clock.now();
    let addr = client_addr.unwrap_or("-");
    let user_key = format!("u:{username}|a:{addr}");
    // Check and record in one step per key, before any work: simultaneous attempts each take a place.
    state
        .login_throttle
        .lock()
        .expect("login throttle lock")
        .begin(&user_key, now)
        .map_err(|r| Error::RateLimited { retry_after: r.0 })?;
    let by_address = state
        .address_throttle
        .lock()
        .expect("login throttle lock")
        .begin(addr, now);
    if let Err(r) = by_address {
        forgive(&state.login_throttle, &user_key, now);
        return Err(Error::RateLimited { retry_after: r.0 });
    }
    let checked = check_credentials(state, username, password).await;
    let user = match checked {
        Ok(Some(u)) => u,
        Ok(None) => {
            tracing::warn!(username, client_addr = addr, "failed console login");
            return Err(Error::Unauthorized("wrong user name or password"));
        }
        Err(e) => {
            // Not a failure of the caller's (the pool was busy, the database down): give the places back.
            forgive(&state.login_throttle, &user_key, now);
            forgive(&state.address_throttle, addr, now);
            return Err(e);
        }
    };
    state
        .login_throttle
        .lock()
        .expect("login throttle lock")
        .record_success(&user_key);
    forgive(&state.address_throttle, addr, now);

    let token = SecretString::from(ids::token());
    let expires_at = now.plus(state.settings.session_idle);
    let session_id = ids::sha256_hex(token.expose_secret());
    sessions::ActiveModel {
        id: Set(session_id.clone()),
        user_id: Set(user.id.clone()),
        project_id: Set(project_id.to_owned()),
        created_at: Set(now.as_millis()),
        expires_at: Set(expires_at.as_millis()),
        last_seen_at: Set(now.as_millis()),
        client_addr: Set(client_addr.map(str::to_owned)),
        user_agent: Set(user_agent.map(|s| s.chars().take(256).collect())),
    }
    .insert(&state.db)
    .await?;
    let mut active = user.clone().into_active_model();
    active.last_login_at = Set(Some(now.as_millis()));
    active.update(&state.db).await?;
    tracing::info!(username = %user.username, client_addr = addr, "console login");
    Ok(NewSession {
        token,
        expires_at,
        user: CurrentUser {
            user_id: user.id,
            username: user.username,
            is_admin: user.is_admin,
            project_id: project_id.to_owned(),
            expires_at,
            session_id,
        },
    })
}

fn forgive(throttle: &std::sync::Mutex<domain::throttle::Throttle>, key: &str, at: Timestamp) {
    throttle
        .lock()
        .expect("login throttle lock")
        .forgive(key, at);
}

/// The user when `password` is theirs; `None` for a wrong name or password (both cost one hash).
async fn check_credentials(
    state: &AppState,
    username: &str,
    password: SecretString,
) -> Result<Option<users::Model>> {
    let user = users::Entity::find()
        .filter(users::Column::Username.eq(username))
        .one(&state.db)
        .await?;
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let ok = state
        .hasher
        .run(move || {
            let phc = phc.as_deref().unwrap_or(DUMMY_HASH.as_str());
            verify_blocking(password.expose_secret(), phc)
        })
        .await?;
    Ok(user.filter(|_| ok))
}

/// Resolves a session token to its user, sliding the idle expiry forward (at most once a minute, to keep
/// writes rare).
///
/// # Errors
/// [`Error::Unauthorized`] when the session is unknown or expired; [`Error::Db`].
pub async fn authenticate(state: &AppState, token: &str) -> Result<CurrentUser> {
    const UNAUTHORIZED: Error = Error::Unauthorized("not logged in or the session expired");
    let now = state.clock.now();
    let id = ids::sha256_hex(token);
    let Some(session) = sessions::Entity::find_by_id(id).one(&state.db).await? else {
        return Err(UNAUTHORIZED);
    };
    let Some(user) = users::Entity::find_by_id(session.user_id.clone())
        .one(&state.db)
        .await?
    else {
        return Err(UNAUTHORIZED);
    };
    let hard_end = Timestamp::from_millis(session.created_at).plus(state.settings.session_max);
    if now.as_millis() >= session.expires_at || now >= hard_end {
        sessions::Entity::delete_by_id(session.id)
            .exec(&state.db)
            .await?;
        return Err(UNAUTHORIZED);
    }
    let mut expires_at = Timestamp::from_millis(session.expires_at);
    if now.as_millis() - session.last_seen_at >= 60_000 {
        expires_at = now.plus(state.settings.session_idle).min(hard_end);
        let mut active = session.clone().into_active_model();
        active.last_seen_at = Set(now.as_millis());
        active.expires_at = Set(expires_at.as_millis());
        active.update(&state.db).await?;
    }
    Ok(CurrentUser {
        user_id: user.id,
        username: user.username,
        is_admin: user.is_admin,
        project_id: session.project_id,
        expires_at,
        session_id: session.id,
    })
}

/// Ends the session of `token` (no error if it does not exist).
///
/// # Errors
/// [`Error::Db`].
pub async fn logout(state: &AppState, token: &str) -> Result<()> {
    sessions::Entity::delete_by_id(ids::sha256_hex(token))
        .exec(&state.db)
        .await?;
    Ok(())
}

/// Deletes expired sessions; returns how many.
///
/// # Errors
/// [`Error::Db`].
pub async fn purge_expired_sessions(state: &AppState) -> Result<u64> {
    let now = state.clock.now().as_millis();
    let res = sessions::Entity::delete_many()
        .filter(sessions::Column::ExpiresAt.lte(now))
        .exec(&state.db)
        .await?;
    Ok(res.rows_affected)
}
