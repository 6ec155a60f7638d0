//! The host side of the agent ABI: the `agent_v1` imports, bound to an agent's store.
//!
//! Every pointer and length comes from the agent and is checked against its memory; bad input
//! is answered with an error code from [`agent_abi::code`], never with a host panic.

use crate::state::AgentState;
use agent_abi::{AgentInfo, IMPORT_MODULE, MAX_LOG_LINE, MAX_MESSAGE, Op, Outcome, code, import};
use wasmtime::{Caller, Linker};

/// The agent's caller, as each import sees it.
type Agent<'a> = Caller<'a, AgentState>;

/// Adds the `agent_v1` functions to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<AgentState>) -> wasmtime::Result<()> {
    linker.func_wrap(IMPORT_MODULE, import::CONTEXT, context)?;
    linker.func_wrap(IMPORT_MODULE, import::SUBMIT, submit)?;
    linker.func_wrap(IMPORT_MODULE, import::TAKE, take)?;
    linker.func_wrap(
        IMPORT_MODULE,
        import::CHECKPOINT_REQUESTED,
        |caller: Agent<'_>| i32::from(caller.data().checkpoint_requested),
    )?;
    linker.func_wrap(IMPORT_MODULE, import::LOG, log)?;
    linker.func_wrap(IMPORT_MODULE, import::FINISH, finish)?;
    Ok(())
}

/// `context(ptr, cap)`: the agent's [`AgentInfo`].
fn context(mut caller: Agent<'_>, ptr: i32, cap: i32) -> i32 {
    let state = caller.data();
    let info = AgentInfo {
        agent_id: state.context.agent_id.to_string(),
        site: state.site.name().to_string(),
        home: state.context.home.clone(),
        hops: state.context.hops(),
        itinerary: state.context.itinerary.clone(),
        args: state.context.args.clone(),
    };
    let mut bytes = Vec::new();
    // Encoding into a Vec cannot fail for this plain data type.
    let _ = ciborium::into_writer(&info, &mut bytes);
    reply(&mut caller, ptr, cap, &bytes)
}

/// `submit(ptr, len)`: the agent's next operation, performed once it suspends.
fn submit(mut caller: Agent<'_>, ptr: i32, len: i32) -> i32 {
    let bytes = match read(&mut caller, ptr, len, MAX_MESSAGE) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let state = caller.data_mut();
    if state.context.pending.is_some() || state.context.result.is_some() {
        return code::BUSY;
    }
    match ciborium::de::from_reader_with_recursion_limit::<Op, _>(bytes.as_slice(), 16) {
        Ok(op) => {
            state.context.pending = Some(op);
            code::OK
        }
        Err(_) => code::BAD_MESSAGE,
    }
}

/// `take(ptr, cap)`: the result of the agent's last operation, once.
fn take(mut caller: Agent<'_>, ptr: i32, cap: i32) -> i32 {
    let Some(result) = caller.data().context.result.as_ref() else {
        return code::NO_RESULT;
    };
    let mut bytes = Vec::new();
    // Encoding into a Vec cannot fail for this plain data type.
    let _ = ciborium::into_writer(result, &mut bytes);
    let n = reply(&mut caller, ptr, cap, &bytes);
    if n >= 0 && n <= cap {
        caller.data_mut().context.result = None; // taken
    }
    n
}

/// `log(level, ptr, len)`: one line of the agent's log, cut to [`MAX_LOG_LINE`].
fn log(mut caller: Agent<'_>, level: i32, ptr: i32, len: i32) {
    let len = len.clamp(0, MAX_LOG_LINE as i32);
    if let Ok(bytes) = read(&mut caller, ptr, len, MAX_LOG_LINE) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let log = &caller.data().log;
        log.push(crate::log::LogSource::Agent(level), text);
    }
}

/// `finish(ptr, len)`: the agent's [`Outcome`].
fn finish(mut caller: Agent<'_>, ptr: i32, len: i32) -> i32 {
    let bytes = match read(&mut caller, ptr, len, MAX_MESSAGE) {
        Ok(b) => b,
        Err(code) => return code,
    };
    match ciborium::de::from_reader_with_recursion_limit::<Outcome, _>(bytes.as_slice(), 16) {
        Ok(outcome) => {
            caller.data_mut().outcome = Some(outcome);
            code::OK
        }
        Err(_) => code::BAD_MESSAGE,
    }
}

/// Copies `len` bytes at `ptr` out of the agent's memory.
fn read(
    caller: &mut Caller<'_, AgentState>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<Vec<u8>, i32> {
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if len > max {
        return Err(code::TOO_LARGE);
    }
    let Some(memory) = caller.data().memory else {
        return Err(code::BAD_POINTER);
    };
    let data = memory.data(&caller);
    data.get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or(code::BAD_POINTER)
}

/// Writes `bytes` at `ptr` when they fit in `cap`; returns their length either way.
fn reply(caller: &mut Caller<'_, AgentState>, ptr: i32, cap: i32, bytes: &[u8]) -> i32 {
    let (ptr, cap) = (ptr as u32 as usize, cap as u32 as usize);
    if bytes.len() > MAX_MESSAGE {
        return code::TOO_LARGE;
    }
    if bytes.len() <= cap {
        let Some(memory) = caller.data().memory else {
            return code::BAD_POINTER;
        };
        let Some(dst) = memory
            .data_mut(&mut *caller)
            .get_mut(ptr..ptr.saturating_add(bytes.len()))
        else {
            return code::BAD_POINTER;
        };
        dst.copy_from_slice(bytes);
    }
    bytes.len() as i32
}
