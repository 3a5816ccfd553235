"""The review loop on an output's rows: what people should look at, exported to their tools (`export`,
`selection`, `documents`, `label_studio`). Reads outputs as `report/` does; nothing here runs a model."""
