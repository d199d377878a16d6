//! The data-loader actor owns the data: it partitions the training pool across clients once and
//! serves shards (again, to a restarted client) and the evaluation sets.

use std::sync::Arc;

use fedbpt::data::Example;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::messages::DataMsg;
use crate::profile::{self, MessageInfo};

pub struct DataLoader;

pub struct DataState {
    pub shards: Vec<Arc<Vec<Example>>>,
    pub dev: Arc<Vec<Example>>,
    pub test: Arc<Vec<Example>>,
}

impl Actor for DataLoader {
    type Msg = DataMsg;
    type State = DataState;
    type Arguments = DataState;

    async fn pre_start(
        &self,
        _me: ActorRef<DataMsg>,
        args: DataState,
    ) -> Result<DataState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _me: ActorRef<DataMsg>,
        msg: DataMsg,
        state: &mut DataState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DataMsg::Shard { client, stamp, reply } => {
                let _span = profile::handling(stamp, || MessageInfo {
                    sender: format!("site-{}", client + 1),
                    receiver: "data-loader".into(),
                    message: "Shard",
                    round: None,
                    bytes: 0,
                });
                let shard = state.shards.get(client).cloned().unwrap_or_default();
                let _ = reply.send(shard);
            }
            DataMsg::EvalSets { stamp, reply } => {
                let _span = profile::handling(stamp, || MessageInfo {
                    sender: "main".into(),
                    receiver: "data-loader".into(),
                    message: "EvalSets",
                    round: None,
                    bytes: 0,
                });
                let _ = reply.send((state.dev.clone(), state.test.clone()));
            }
        }
        Ok(())
    }
}
