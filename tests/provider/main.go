// Command pulumi-resource-pulumidtest is a tiny resource provider plugin for pulumid's
// end-to-end tests and benchmarks. Its one resource, pulumidtest:index:Item, echoes its
// inputs as outputs and adds a deterministic `payload` of `payloadSize` bytes, so tests can
// build large states without any cloud. `fail` makes Create fail and `delayMs` slows
// Create/Update down (to interrupt the CLI mid-update). A change of `replaceKey` asks for a
// replacement. Per-resource work is kept minimal: the provider sets the floor of the
// benchmarks.
//
// A "cloud" for crash tests: with PULUMIDTEST_CREATE_LOG=PATH set, each Create gets an id of
// its own (item-NAME-RANDOM, so a re-create is visible) and appends one line "NAME ID" to
// PATH; with PULUMIDTEST_DELETE_LOG=PATH set, each Delete appends "NAME ID" to that file.
// Read then reports a resource gone unless its id was created and not deleted, so `pulumi
// refresh` sees the cloud those files describe.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/provider"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	version = "1.0.0"
	// Signature key/value of a secret value in the gRPC wire format.
	sigKey    = "4dabf18193072939515e22adb298388d"
	secretSig = "1b47061264138c4ac30d75fd1eb44270"
)

const schema = `{
  "name": "pulumidtest",
  "version": "1.0.0",
  "description": "Test resources for pulumid.",
  "resources": {
    "pulumidtest:index:Item": {
      "inputProperties": {
        "name": {"type": "string"},
        "payloadSize": {"type": "integer"},
        "fail": {"type": "boolean"},
        "delayMs": {"type": "integer"},
        "replaceKey": {"type": "string"},
        "secret": {"type": "string", "secret": true}
      },
      "properties": {
        "name": {"type": "string"},
        "payloadSize": {"type": "integer"},
        "fail": {"type": "boolean"},
        "delayMs": {"type": "integer"},
        "replaceKey": {"type": "string"},
        "secret": {"type": "string", "secret": true},
        "payload": {"type": "string"}
      }
    }
  }
}`

type server struct {
	pulumirpc.UnimplementedResourceProviderServer
}

func main() {
	_ = provider.Main("pulumidtest", func(*provider.HostClient) (pulumirpc.ResourceProviderServer, error) {
		return &server{}, nil
	})
}

// field returns a top-level input, looking through a secret wrapper.
func field(s *structpb.Struct, key string) *structpb.Value {
	v := s.GetFields()[key]
	if o := v.GetStructValue(); o != nil && o.GetFields()[sigKey].GetStringValue() == secretSig {
		return o.GetFields()["value"]
	}
	return v
}

// outputs returns the inputs plus a `payload` of exactly payloadSize bytes, after sleeping delayMs.
func outputs(ctx context.Context, inputs *structpb.Struct) (*structpb.Struct, error) {
	if ms := field(inputs, "delayMs").GetNumberValue(); ms > 0 {
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	out := &structpb.Struct{Fields: make(map[string]*structpb.Value, len(inputs.GetFields())+1)}
	for k, v := range inputs.GetFields() {
		out.Fields[k] = v
	}
	if size := int(field(inputs, "payloadSize").GetNumberValue()); size > 0 {
		unit := hex.EncodeToString([]byte(field(inputs, "name").GetStringValue() + "/"))
		out.Fields["payload"] = structpb.NewStringValue(strings.Repeat(unit, size/len(unit)+1)[:size])
	}
	return out, nil
}

func (*server) GetSchema(context.Context, *pulumirpc.GetSchemaRequest) (*pulumirpc.GetSchemaResponse, error) {
	return &pulumirpc.GetSchemaResponse{Schema: schema}, nil
}

func (*server) GetPluginInfo(context.Context, *emptypb.Empty) (*pulumirpc.PluginInfo, error) {
	return &pulumirpc.PluginInfo{Version: version}, nil
}

func (*server) GetMapping(context.Context, *pulumirpc.GetMappingRequest) (*pulumirpc.GetMappingResponse, error) {
	return &pulumirpc.GetMappingResponse{}, nil
}

func (*server) GetMappings(context.Context, *pulumirpc.GetMappingsRequest) (*pulumirpc.GetMappingsResponse, error) {
	return &pulumirpc.GetMappingsResponse{}, nil
}

func (*server) CheckConfig(_ context.Context, req *pulumirpc.CheckRequest) (*pulumirpc.CheckResponse, error) {
	return &pulumirpc.CheckResponse{Inputs: req.GetNews()}, nil
}

func (*server) DiffConfig(context.Context, *pulumirpc.DiffRequest) (*pulumirpc.DiffResponse, error) {
	return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_NONE}, nil
}

func (*server) Configure(context.Context, *pulumirpc.ConfigureRequest) (*pulumirpc.ConfigureResponse, error) {
	return &pulumirpc.ConfigureResponse{AcceptSecrets: true, AcceptResources: true}, nil
}

func (*server) Check(_ context.Context, req *pulumirpc.CheckRequest) (*pulumirpc.CheckResponse, error) {
	return &pulumirpc.CheckResponse{Inputs: req.GetNews()}, nil
}

func (*server) Diff(_ context.Context, req *pulumirpc.DiffRequest) (*pulumirpc.DiffResponse, error) {
	olds := req.GetOldInputs()
	if olds == nil {
		olds = req.GetOlds()
	}
	var changed []string
	for k, v := range req.GetNews().GetFields() {
		if !proto.Equal(v, olds.GetFields()[k]) {
			changed = append(changed, k)
		}
	}
	for k := range olds.GetFields() {
		if _, ok := req.GetNews().GetFields()[k]; !ok && (req.GetOldInputs() != nil || k != "payload") {
			changed = append(changed, k)
		}
	}
	if len(changed) == 0 {
		return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_NONE}, nil
	}
	sort.Strings(changed)
	var replaces []string
	for _, k := range changed {
		if k == "replaceKey" {
			replaces = append(replaces, k)
		}
	}
	return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_SOME, Diffs: changed, Replaces: replaces}, nil
}

func (*server) Create(ctx context.Context, req *pulumirpc.CreateRequest) (*pulumirpc.CreateResponse, error) {
	props := req.GetProperties()
	if field(props, "fail").GetBoolValue() {
		return nil, errors.New("pulumidtest: create failed as asked")
	}
	out, err := outputs(ctx, props)
	if err != nil {
		return nil, err
	}
	name := field(props, "name").GetStringValue()
	id := "item-" + name
	createLog := os.Getenv("PULUMIDTEST_CREATE_LOG")
	if id == "item-" || createLog != "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		if name != "" {
			id += "-"
		}
		id += hex.EncodeToString(b[:])
	}
	if err := appendLine(createLog, name, id); err != nil {
		return nil, err
	}
	return &pulumirpc.CreateResponse{Id: id, Properties: out}, nil
}

// appendLine appends "NAME ID\n" to the file at path (nothing when path is empty) with one
// O_APPEND write, so lines of concurrent calls never interleave.
func appendLine(path, name, id string) error {
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write([]byte(name + " " + id + "\n"))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// logged reports whether the file at path has a line ending in " ID".
func logged(path, id string) (bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	return strings.Contains("\n"+string(data), " "+id+"\n"), nil
}

func (*server) Read(_ context.Context, req *pulumirpc.ReadRequest) (*pulumirpc.ReadResponse, error) {
	if createLog := os.Getenv("PULUMIDTEST_CREATE_LOG"); createLog != "" {
		created, err := logged(createLog, req.GetId())
		if err != nil {
			return nil, err
		}
		deleted := false
		if deleteLog := os.Getenv("PULUMIDTEST_DELETE_LOG"); created && deleteLog != "" {
			if deleted, err = logged(deleteLog, req.GetId()); err != nil {
				return nil, err
			}
		}
		if !created || deleted {
			return &pulumirpc.ReadResponse{}, nil // gone from the cloud
		}
	}
	return &pulumirpc.ReadResponse{Id: req.GetId(), Properties: req.GetProperties(), Inputs: req.GetInputs()}, nil
}

func (*server) Update(ctx context.Context, req *pulumirpc.UpdateRequest) (*pulumirpc.UpdateResponse, error) {
	out, err := outputs(ctx, req.GetNews())
	if err != nil {
		return nil, err
	}
	return &pulumirpc.UpdateResponse{Properties: out}, nil
}

func (*server) Delete(_ context.Context, req *pulumirpc.DeleteRequest) (*emptypb.Empty, error) {
	name := field(req.GetProperties(), "name").GetStringValue()
	if err := appendLine(os.Getenv("PULUMIDTEST_DELETE_LOG"), name, req.GetId()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (*server) Cancel(context.Context, *emptypb.Empty) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
