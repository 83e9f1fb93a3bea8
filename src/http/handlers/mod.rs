//! Handlers, by resource. Each translates: it reads the request, asks the supervisor (or
//! reads the store's view) and shapes the answer.

pub mod api_keys;
pub mod backups;
pub mod chats;
pub mod contacts;
pub mod content;
pub mod fleet;
pub mod groups;
pub mod health;
pub mod lifecycle;
pub mod media;
pub mod message_acts;
pub mod messages;
pub mod proxy;
pub mod queue;
pub mod received_media;
pub mod sessions;
pub mod sim;
pub mod stream;
pub mod webhooks;

use ractor::rpc::CallResult;

use botvisor_actors::{Action, Command, Done, Reply, SupervisorMsg};

use super::errors::ApiError;
use super::App;

/// Sends one message to the supervisor and waits for its answer, as long as the
/// supervisor's own deadlines for `cmd` allow.
pub async fn ask<T: Send + 'static>(
    app: &App,
    cmd: Command,
    build: impl FnOnce(Reply<T>) -> SupervisorMsg,
) -> Result<T, ApiError> {
    let timeout = app.supervisor.reply_deadline(cmd);
    match app.sup.call(build, Some(timeout)).await {
        Ok(CallResult::Success(r)) => r.map_err(ApiError::from),
        Ok(CallResult::Timeout) => Err(ApiError::unavailable("The request timed out; try again")),
        Ok(CallResult::SenderError) | Err(_) => Err(ApiError::unavailable(
            "The supervisor is not available (shutting down?)",
        )),
    }
}

/// Runs an action of an online session (a send, a number check): what the network
/// answered, or why not.
pub async fn act(app: &App, user_id: &str, action: Action) -> Result<Done, ApiError> {
    let user_id = user_id.to_string();
    ask(app, Command::Send, |reply| SupervisorMsg::Act {
        user_id,
        action,
        reply,
    })
    .await
}

/// 500: an action answered with another kind of [`Done`] than its own (a bug).
pub fn wrong_answer(action: &str, done: &Done) -> ApiError {
    ApiError::new(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        format!("a {action} answered {done:?}"),
    )
}

/// 404 unless the session exists.
pub fn must_exist(app: &App, id: &str) -> Result<(), ApiError> {
    match app.store.view().read(id, |_| ()) {
        Some(()) => Ok(()),
        None => Err(ApiError::no_session(id)),
    }
}
