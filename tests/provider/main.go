// Command pulumi-resource-pulumidtest is a tiny resource provider plugin for pulumid's
// end-to-end tests and benchmarks. Its one resource, pulumidtest:index:Item, echoes its
// inputs as outputs and adds a deterministic `payload` of `payloadSize` bytes, so tests can
// build large states without any cloud. `fail` makes Create fail and `delayMs` slows
// Create/Update down (to interrupt the CLI mid-update). Per-resource work is kept minimal:
// the provider sets the floor of the benchmarks.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
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
        "secret": {"type": "string", "secret": true}
      },
      "properties": {
        "name": {"type": "string"},
        "payloadSize": {"type": "integer"},
        "fail": {"type": "boolean"},
        "delayMs": {"type": "integer"},
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
	return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_SOME, Diffs: changed}, nil
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
	id := "item-" + field(props, "name").GetStringValue()
	if id == "item-" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		id += hex.EncodeToString(b[:])
	}
	return &pulumirpc.CreateResponse{Id: id, Properties: out}, nil
}

func (*server) Read(_ context.Context, req *pulumirpc.ReadRequest) (*pulumirpc.ReadResponse, error) {
	return &pulumirpc.ReadResponse{Id: req.GetId(), Properties: req.GetProperties(), Inputs: req.GetInputs()}, nil
}

func (*server) Update(ctx context.Context, req *pulumirpc.UpdateRequest) (*pulumirpc.UpdateResponse, error) {
	out, err := outputs(ctx, req.GetNews())
	if err != nil {
		return nil, err
	}
	return &pulumirpc.UpdateResponse{Properties: out}, nil
}

func (*server) Delete(context.Context, *pulumirpc.DeleteRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func (*server) Cancel(context.Context, *emptypb.Empty) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
